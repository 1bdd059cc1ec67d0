// Tensor parallelism (Megatron style), kept out of the family files as gpt-fast's tp.py
// keeps it out of its model. A family declares, in one table, which linear layers split
// by output rows (column-parallel: Q, K, V, gate, up) and which by input columns
// (row-parallel: O, down); its forward is a generator that yields its partial sums at
// the two all-reduce points of a layer (after O, after down). This file checks that a
// config splits evenly, gives each rank its share of heads and neurons, and runs the
// ranks' passes in lockstep, all-reducing at every yield.
//
// Every rank keeps the whole residual stream (embedding replicated: on the CPU a pointer
// into the mapping); rank 0, the leader, alone runs the final norm and the LM head
// (unsplit) and returns the logits. The KV cache splits by KV heads (kv/cache.ts).

import type { Backend, Ptr } from "../backend/backend";
import type { Communicator } from "../backend/comm";
import type { DeviceGroup, Split } from "../backend/group";
import type { PagedKV, TokenBatch } from "./batch";
import type { CausalLM, DeviceLogits } from "./causal-lm";
import type { ModelConfig } from "./config";
import type { LoadedModel } from "./load";

/** Split of each linear layer, by the last component of its name ("q_proj"); layers not
 *  named are replicated. */
export type TensorSplits = Readonly<Record<string, Split>>;

/** Where one rank's model lives. */
export interface Placement {
  group: DeviceGroup;
  rank: number;
  splits: TensorSplits;
}

/** An all-reduce point of a forward pass: `count` floats at `ptr` to sum over the ranks. */
export interface PartialSum {
  ptr: Ptr;
  count: number;
}

/** A forward pass that yields at each all-reduce point and returns the logits (no rows
 *  on ranks other than the leader). */
export type ForwardPass = Generator<PartialSum, DeviceLogits, void>;

/** A model whose forward can run as one rank of a split. */
export interface SplittableLM extends CausalLM {
  pass(batch: TokenBatch, kv: PagedKV): ForwardPass;
}

/** Runs a pass on one device: nothing to sum with. */
export function runAlone(pass: ForwardPass): DeviceLogits {
  let step = pass.next();
  while (!step.done) step = pass.next();
  return step.value;
}

/** Refuses a config whose heads, KV heads or MLP neurons do not divide over `n` ranks. */
export function checkSplittable(c: ModelConfig, n: number): void {
  if (!Number.isInteger(n) || n < 1) throw new Error(`tensorParallel must be a positive integer, got ${n}`);
  const parts: [number, string][] = [
    [c.numHeads, "attention heads"],
    [c.numKvHeads, `KV heads (GQA: ${c.numHeads} query heads share ${c.numKvHeads} KV heads)`],
    [c.intermediateSize, "MLP neurons (intermediate size)"],
  ];
  for (const [count, what] of parts) {
    if (count % n !== 0) throw new Error(`tensor parallelism over ${n} devices: the model's ${count} ${what} do not divide by ${n}`);
  }
}

/** One rank's share of a config split over `n` ranks: heads, KV heads and neurons. */
export function rankConfig(c: ModelConfig, n: number): ModelConfig {
  return { ...c, numHeads: c.numHeads / n, numKvHeads: c.numKvHeads / n, intermediateSize: c.intermediateSize / n };
}

/** The ranks of a split model behind the one CausalLM interface. */
export class ParallelModel implements CausalLM {
  readonly config: ModelConfig;
  readonly maxBatchTokens: number;
  readonly maxLogitRows: number;
  readonly maxWords: number;
  readonly backend: Backend;
  readonly shards: readonly Backend[];
  private readonly comm: Communicator;
  private readonly sums: Ptr[];

  constructor(private readonly ranks: readonly SplittableLM[], group: DeviceGroup, readonly files: LoadedModel) {
    const lead = ranks[0]!;
    this.config = files.config;
    this.maxBatchTokens = lead.maxBatchTokens;
    this.maxLogitRows = lead.maxLogitRows;
    this.maxWords = lead.maxWords;
    this.backend = lead.backend;
    this.shards = ranks.map((r) => r.backend);
    this.comm = group.comm;
    this.sums = ranks.map(() => 0);
  }

  forward(batch: TokenBatch, kv: PagedKV): Float32Array {
    return this.run(batch, kv).host();
  }

  run(batch: TokenBatch, kv: PagedKV): DeviceLogits {
    if (kv.devices !== this.ranks.length) {
      throw new Error(`forward: the model is split over ${this.ranks.length} devices but its KV cache over ${kv.devices}; make the cache with createKVCache(model)`);
    }
    const passes = this.ranks.map((m, r) => m.pass(batch, kv.shard(r)));
    for (;;) {
      const lead = passes[0]!.next();
      // Every rank runs the same layers: the others reach the same point (or the end).
      for (let r = 1; r < passes.length; r++) {
        const step = passes[r]!.next();
        if (!step.done) this.sums[r] = step.value.ptr;
      }
      if (lead.done) return lead.value;
      this.sums[0] = lead.value.ptr;
      this.comm.allReduceSum(this.sums, lead.value.count);
    }
  }

  close(): void {
    for (const r of this.ranks) r.close();
  }
}

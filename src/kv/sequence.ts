// One sequence through one model with its own one-row cache: the "open, reserve, add a
// chain, forward, commit" that tools, benchmarks and the engine's cost measurement
// need outside the engine.

import { BatchBuilder } from "../model/batch";
import type { CausalLM } from "../model/causal-lm";
import { createKVCache, type KVCache, type KVDType } from "./cache";

export class SequenceRunner {
  private readonly kv: KVCache;
  private row: number;

  constructor(readonly model: CausalLM, maxSeqLen: number, kvDtype?: KVDType) {
    this.kv = createKVCache(model, { maxSeqs: 1, maxSeqLen, dtype: kvDtype });
    this.row = this.kv.openSequence();
  }

  /** Tokens whose K/V is in the cache. */
  get length(): number {
    return this.kv.committed(this.row);
  }

  /** Feeds `tokens` after the cached ones as one chain; returns the logits rows asked
   *  for (a view reused by the next forward). `commit: false` leaves the cache as it was. */
  feed(tokens: ArrayLike<number>, logits: "all" | "last" | "none", commit = true): Float32Array {
    const at = this.length;
    this.kv.reserve(this.row, tokens.length);
    const b = new BatchBuilder(this.model.maxWords);
    b.addChain(this.row, at, tokens, at, logits);
    const out = this.model.forward(b.build(), this.kv);
    if (commit) this.kv.commitPrefix(this.row, tokens.length);
    else this.kv.commit(this.row, []);
    return out;
  }

  /** Forgets every cached token. */
  reset(): void {
    this.kv.closeSequence(this.row);
    this.row = this.kv.openSequence();
  }

  close(): void {
    this.kv.close();
  }
}

// Our side of the CPU benchmark: the same four measurements as bench/llamacpp.ts, on
// CausalLM.forward directly (one sequence, paged KV cache, greedy argmax in JS, as
// bench:forward does).

import { createKVCache, type KVCache } from "../../src/kv/cache";
import { BatchBuilder } from "../../src/model/batch";
import type { CausalLM } from "../../src/model/causal-lm";

export class OurSession {
  private kv: KVCache;
  private row: number;

  constructor(readonly model: CausalLM, readonly maxSeqLen: number) {
    this.kv = createKVCache(model, { maxSeqs: 1, maxSeqLen });
    this.row = this.kv.openSequence();
  }

  private reset(): void {
    this.kv.closeSequence(this.row);
    this.row = this.kv.openSequence();
  }

  /** Logits after every prefix of `tokens` (one prefill chain, all rows). */
  logits(tokens: number[]): Float32Array[] {
    this.reset();
    const V = this.model.config.vocabSize;
    const rows: Float32Array[] = [];
    // A chunk's logit rows are capped by maxLogitRows; prefill in chunks.
    const chunk = Math.min(this.model.maxLogitRows, this.model.maxBatchTokens);
    for (let at = 0; at < tokens.length; at += chunk) {
      const part = tokens.slice(at, at + chunk);
      this.kv.reserve(this.row, part.length);
      const b = new BatchBuilder(this.model.maxWords);
      b.addChain(this.row, at, part, at, "all");
      const out = this.model.forward(b.build(), this.kv);
      for (let i = 0; i < part.length; i++) rows.push(out.slice(i * V, (i + 1) * V));
      this.kv.commitPrefix(this.row, part.length);
    }
    this.reset();
    return rows;
  }

  /** Milliseconds to prefill `tokens` from an empty cache (logits of the last one only). */
  prefill(tokens: number[]): number {
    this.reset();
    const t = performance.now();
    for (let at = 0; at < tokens.length; at += this.model.maxBatchTokens) {
      const part = tokens.slice(at, at + this.model.maxBatchTokens);
      this.kv.reserve(this.row, part.length);
      const b = new BatchBuilder(this.model.maxWords);
      b.addChain(this.row, at, part, at, at + part.length === tokens.length ? "last" : "none");
      this.model.forward(b.build(), this.kv);
      this.kv.commitPrefix(this.row, part.length);
    }
    return performance.now() - t;
  }

  /** After a prefill: `steps` greedy single-token steps. Milliseconds. */
  decode(first: number, steps: number): { ms: number; tokens: number[] } {
    const V = this.model.config.vocabSize;
    const tokens: number[] = [];
    let token = first;
    const t = performance.now();
    for (let i = 0; i < steps; i++) {
      const pos = this.kv.committed(this.row);
      this.kv.reserve(this.row, 1);
      const b = new BatchBuilder(1);
      b.add(this.row, pos, token, pos, -1, true);
      const logits = this.model.forward(b.build(), this.kv);
      this.kv.commitPrefix(this.row, 1);
      token = argmax(logits, 0, V);
      tokens.push(token);
    }
    return { ms: performance.now() - t, tokens };
  }

  /** After a prefill: one forward of L tokens with logits at every row, as a chain or
   *  as a tree (node i's parent is (i-1)/2: a binary tree, positions by depth); the
   *  tokens are not committed. Milliseconds. */
  verify(tokens: number[], shape: "chain" | "tree"): number {
    const committed = this.kv.committed(this.row);
    this.kv.reserve(this.row, tokens.length);
    const b = new BatchBuilder(this.model.maxWords);
    if (shape === "chain") b.addChain(this.row, committed, tokens, committed, "all");
    else {
      const depth: number[] = [];
      for (let i = 0; i < tokens.length; i++) {
        const parent = i === 0 ? -1 : (i - 1) >> 1;
        depth.push(parent < 0 ? 0 : depth[parent] + 1);
        b.add(this.row, committed, tokens[i], committed + depth[i], parent, true);
      }
    }
    const batch = b.build();
    const t = performance.now();
    this.model.forward(batch, this.kv);
    return performance.now() - t;
  }

  close(): void {
    this.kv.close();
  }
}

export function argmax(x: ArrayLike<number>, from: number, n: number): number {
  let best = 0;
  let bestV = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = x[from + i];
    if (v > bestV) {
      bestV = v;
      best = i;
    }
  }
  return best;
}

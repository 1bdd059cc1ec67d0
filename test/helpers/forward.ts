// One sequence through a model as a single prefill chain: the logits of every position.
import { createKVCache } from "../../src/kv/cache";
import { BatchBuilder } from "../../src/model/batch";
import type { LlamaModel } from "../../src/model/llama";

export function chainLogits(model: LlamaModel, tokens: number[]): Float32Array[] {
  const kv = createKVCache(model, { maxSeqs: 1, maxSeqLen: tokens.length });
  const row = kv.openSequence();
  kv.reserve(row, tokens.length);
  const b = new BatchBuilder(model.maxWords);
  b.addChain(row, 0, tokens, 0, "all");
  const logits = model.forward(b.build(), kv);
  kv.close();
  const V = model.config.vocabSize;
  return tokens.map((_, i) => logits.slice(i * V, (i + 1) * V));
}

/** max |got - want| / max |want| over all positions: one scale for a whole logit table. */
export function maxRelError(got: ArrayLike<number>[], want: ArrayLike<number>[]): number {
  let diff = 0;
  let ref = 0;
  for (let t = 0; t < want.length; t++) {
    for (let i = 0; i < want[t].length; i++) {
      diff = Math.max(diff, Math.abs(got[t][i] - want[t][i]));
      ref = Math.max(ref, Math.abs(want[t][i]));
    }
  }
  return diff / ref;
}

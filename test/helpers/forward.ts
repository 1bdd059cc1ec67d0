// One sequence through a model as a single prefill chain: the logits of every position.
import type { KVDType } from "../../src/backend/backend";
import { SequenceRunner } from "../../src/kv/sequence";
import type { CausalLM } from "../../src/model/causal-lm";

/** `kvDtype` defaults to the cache's default (F16); comparisons with float64 want F32. */
export function chainLogits(model: CausalLM, tokens: number[], kvDtype?: KVDType): Float32Array[] {
  const seq = new SequenceRunner(model, tokens.length, kvDtype);
  const logits = seq.feed(tokens, "all");
  seq.close();
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

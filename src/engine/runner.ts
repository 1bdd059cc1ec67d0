// The runner turns a step plan into one TokenBatch and runs the LLM on it: drafters
// grow the decode entries' trees (unless drafted in an earlier step), the trees and
// prefill chunks are laid into the batch, one forward returns the logits every entry needs.

import type { KVCache } from "../kv/cache";
import { BatchBuilder } from "../model/batch";
import type { CausalLM, DeviceLogits } from "../model/causal-lm";
import type { Speculator, StepDraft } from "../speculation/speculator";
import { StepGraphs } from "./graphs";
import type { StepEntry } from "./scheduler";

/** Per LLM: its forward through CUDA graphs (a plain forward on the CPU). The graphs live
 *  in the backend's context until the backend closes. */
const stepGraphs = new WeakMap<CausalLM, StepGraphs>();

function graphsOf(llm: CausalLM): StepGraphs {
  let g = stepGraphs.get(llm);
  if (!g) {
    g = new StepGraphs(llm);
    stepGraphs.set(llm, g);
  }
  return g;
}

export interface EntryRows {
  /** First logits row of the entry, and how many it has. */
  first: number;
  count: number;
  /** The merged tree verified for a decode entry (null: plain decode or prefill). */
  tree: StepDraft | null;
}

export interface StepRun {
  /** On the LLM's device: the sampler reads them there. */
  logits: DeviceLogits;
  rows: EntryRows[];
  batchTokens: number;
  draftMs: number;
  forwardMs: number;
}

export function runStep(llm: CausalLM, kv: KVCache, speculator: Speculator | null, entries: StepEntry[]): StepRun {
  const t0 = performance.now();
  const decoding = entries.flatMap((e) => (e.kind === "decode" && e.draft && e.drafted === undefined ? [e] : []));
  const trees = speculator && decoding.length > 0
    ? speculator.draft(decoding.map((e) => ({ request: e.req.id, tokens: e.req.tokens, params: e.req.params, rng: e.req.rng, plan: e.draft! })))
    : [];
  const draftMs = performance.now() - t0;

  const builder = new BatchBuilder(llm.maxWords);
  const rows: EntryRows[] = [];
  let logitRows = 0;
  for (const e of entries) {
    const req = e.req;
    const committed = kv.committed(req.row);
    if (e.kind === "decode") {
      const tree = e.drafted !== undefined ? e.drafted : e.draft ? trees[decoding.indexOf(e)] : null;
      const root = req.tokens[req.tokens.length - 1];
      if (tree) tree.linearize(builder, req.row, committed, root, req.tokens.length - 1);
      else builder.add(req.row, committed, root, req.tokens.length - 1, -1, true);
      const count = 1 + (tree?.size ?? 0);
      rows.push({ first: logitRows, count, tree });
      logitRows += count;
    } else {
      builder.addChain(req.row, committed, req.tokens.slice(e.start, e.start + e.count), e.start, e.emits ? "last" : "none");
      rows.push({ first: logitRows, count: e.emits ? 1 : 0, tree: null });
      if (e.emits) logitRows++;
    }
  }
  const batch = builder.build();
  const t1 = performance.now();
  const logits = graphsOf(llm).run(batch, kv);
  return { logits, rows, batchTokens: batch.n, draftMs, forwardMs: performance.now() - t1 };
}

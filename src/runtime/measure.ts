// Forward costs measured at load, which "auto" speculation sizes its trees by.

import { CostCurve, CostModel, measurementGrid } from "../engine/cost";
import { SequenceRunner } from "../kv/sequence";
import type { CausalLM } from "../model/causal-lm";
import { AUTO_MAX_DEPTH } from "../speculation/speculator";

export type CurvePoint = { tokens: number; ms: number };

/** t(L) of `model` for each L of `grid`: the minimum of two runs each, after a warm-up. */
export function measureCurve(model: CausalLM, grid: number[]): CurvePoint[] {
  const seq = new SequenceRunner(model, grid[grid.length - 1] + 1);
  const tokens = (n: number) => Array.from({ length: n }, (_, i) => 1 + (i % (model.config.vocabSize - 1)));
  seq.feed(tokens(grid[grid.length - 1]), "all", false); // warm-up: page in the weights
  const points = grid.map((l) => {
    let best = Infinity;
    for (let r = 0; r < 2; r++) {
      const t0 = performance.now();
      seq.feed(tokens(l), "all", false);
      best = Math.min(best, performance.now() - t0);
    }
    return { tokens: l, ms: best };
  });
  seq.close();
  return points;
}

/** The SSMs' forward times summed over `grid` (they draft one after another). */
export function summedCurve(ssms: CausalLM[], grid: number[]): CurvePoint[] {
  const summed = grid.map((l) => ({ tokens: l, ms: 0 }));
  for (const s of ssms) measureCurve(s, grid).forEach((p, i) => (summed[i].ms += p.ms));
  return summed;
}

/** The LLM's t(L) over a grid of batch sizes, and the drafters' (`draftCurve` measures
 *  them where they run). */
export function measureCosts(
  llm: CausalLM,
  draftCurve: (grid: number[]) => CurvePoint[],
  maxRows: number,
  maxRequests: number,
  progress: (f: number) => void = () => {},
): CostModel {
  const llmPoints = measureCurve(llm, measurementGrid(Math.min(maxRows, 64)));
  progress(0.7);
  const draftPoints = draftCurve(measurementGrid(Math.min(2 * maxRequests, 32)));
  progress(1);
  return new CostModel(new CostCurve(llmPoints), new CostCurve(draftPoints), AUTO_MAX_DEPTH);
}

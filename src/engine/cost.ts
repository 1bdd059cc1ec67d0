// What a step costs and what a tree yields, measured rather than assumed: t(L), the
// LLM's forward time for L batch tokens, and the drafters' time per forward, measured
// at load over a grid of L and refined by every step's observed times; acceptance by
// depth as decaying averages (per request, started from the engine-wide one). From
// these the scheduler picks, per request, the chain length that maximises the whole
// batch's expected tokens per second.

import { AcceptanceByDepth } from "./request";

/** Time (ms) as a function of batch tokens: linear between measured points, refined
 *  by observations near them. */
export class CostCurve {
  private readonly xs: number[];
  private readonly ms: number[];

  constructor(points: { tokens: number; ms: number }[]) {
    if (points.length === 0) throw new Error("cost curve: no measurements");
    const sorted = [...points].sort((a, b) => a.tokens - b.tokens);
    this.xs = sorted.map((p) => p.tokens);
    this.ms = sorted.map((p) => p.ms);
  }

  at(tokens: number): number {
    const { xs, ms } = this;
    if (tokens <= xs[0]) return ms[0];
    for (let i = 1; i < xs.length; i++) {
      if (tokens <= xs[i]) return ms[i - 1] + ((ms[i] - ms[i - 1]) * (tokens - xs[i - 1])) / (xs[i] - xs[i - 1]);
    }
    // Past the grid: the last segment's slope (forward cost grows about linearly).
    const n = xs.length;
    const slope = n > 1 ? (ms[n - 1] - ms[n - 2]) / (xs[n - 1] - xs[n - 2]) : ms[0] / xs[0];
    return ms[n - 1] + slope * (tokens - xs[n - 1]);
  }

  /** Moves the measured points around `tokens` a little towards an observed time, each
   *  by its share in the interpolation there (past the grid: the last point), so sizes
   *  between grid points, the ones trees make, correct the curve too. */
  observe(tokens: number, ms: number, weight = 0.05): void {
    const { xs } = this;
    const step = weight * (ms - this.at(tokens));
    const i = xs.findIndex((x) => tokens <= x);
    if (i <= 0) {
      this.ms[i === 0 ? 0 : xs.length - 1] += step;
      return;
    }
    const f = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1]);
    this.ms[i - 1] += (1 - f) * step;
    this.ms[i] += f * step;
  }

  get points(): { tokens: number; ms: number }[] {
    return this.xs.map((tokens, i) => ({ tokens, ms: Math.round(this.ms[i] * 1000) / 1000 }));
  }
}

/** Batch sizes the load-time measurement times: every size up to 16 (kernels work in
 *  token tiles, so t(L) rises in steps there, where chains are sized), then powers of
 *  two up to `max`. */
export function measurementGrid(max: number): number[] {
  const grid: number[] = [];
  for (let l = 1; l <= Math.min(max, 16); l++) grid.push(l);
  for (let l = 32; l < max; l *= 2) grid.push(l);
  if (grid[grid.length - 1] !== max) grid.push(max);
  return grid;
}

export interface AutoCandidate {
  /** This request's own acceptance estimate. */
  acceptance: AcceptanceByDepth;
  /** Longest chain it may get this step. */
  maxDepth: number;
}

/** Least predicted gain in tokens per second for which a step drafts at all. */
const REQUIRED_GAIN = 0.1;

export class CostModel {
  /** Engine-wide acceptance by depth: the starting point of every new request's. */
  readonly acceptance: AcceptanceByDepth;
  /** Observed draft time over predicted SSM forward time (JS overhead per depth). */
  private draftOverhead = 1;
  /** Observed forward time of steps with tree rows over t(L) (measured on one chain,
   *  refined by plain steps): what verifying trees of many requests costs beyond it. */
  private treeOverhead = 1;

  constructor(
    readonly llm: CostCurve,
    /** Summed over all SSMs; null without SSMs (drafting is then nearly free). */
    readonly drafter: CostCurve | null,
    maxDepth: number,
  ) {
    // A neutral prior: a chain of depth d pays while acceptance is high enough; the
    // first steps' observations replace it quickly.
    this.acceptance = new AcceptanceByDepth(Array(maxDepth).fill(0.6));
  }

  /** Predicted drafting time for chains of the given lengths (one SSM forward per depth
   *  for all requests still growing, the catch-up pass at depth 0). */
  draftMs(depths: readonly number[]): number {
    const growing: number[] = [];
    for (const k of depths) for (let d = 0; d < k; d++) growing[d] = (growing[d] ?? 0) + 1;
    return this.draftMsOf(growing);
  }

  /** Drafting time given, per depth, how many chains reach past it. */
  private draftMsOf(growing: readonly number[]): number {
    if (!this.drafter) return 0;
    let ms = 0;
    // The catch-up pass feeds the root and the tokens accepted last step.
    for (let d = 0; d < growing.length && growing[d] > 0; d++) ms += this.drafter.at(d === 0 ? 2 * growing[d] : growing[d]);
    return ms * this.draftOverhead;
  }

  /** Whether adding a chain of `depth` nodes, each accepted at `rate`, to a step of
   *  `rows` rows yielding `tokens` tokens (the chain's root included in both) raises its
   *  rate by the required gain, on the measured curves and drafting times, leaving out
   *  the learned tree overhead and acceptance. Probes ask this: they exist to correct
   *  those, so they must not depend on them (a few slow tree steps early on would
   *  otherwise stop drafting for good). */
  chainPaysOnCurves(depth: number, rate: number, rows: number, tokens: number): boolean {
    const draft = this.draftMsOf(Array(depth).fill(1));
    const chainTokens = tokens + new AcceptanceByDepth(Array(depth).fill(rate)).expectedTokens(depth) - 1;
    return chainTokens / (this.llm.at(rows + depth) + draft) >= (tokens / this.llm.at(rows)) * (1 + REQUIRED_GAIN);
  }

  /** A step's forward time: plain steps refine t(L), steps with tree rows the
   *  overhead of trees over it. */
  observeStep(tokens: number, ms: number, treeRows: boolean): void {
    if (!treeRows) return this.llm.observe(tokens, ms);
    this.treeOverhead += 0.1 * (Math.min(3, Math.max(0.5, ms / this.llm.at(tokens))) - this.treeOverhead);
  }

  observeDraft(depths: readonly number[], ms: number): void {
    const predicted = this.draftMs(depths) / this.draftOverhead;
    if (predicted > 0) this.draftOverhead += 0.1 * (Math.min(10, ms / predicted) - this.draftOverhead);
  }

  /** Chain length per candidate maximising expected tokens per second of the whole
   *  step, given `fixedRows` batch rows already taken (prefill chunks, fixed trees,
   *  plain decodes; `fixedTrees` when they hold trees) and `fixedTokens` tokens those
   *  yield. Greedy: apply the one
   *  lengthening (of any request, by any number of nodes, since a first node pays the
   *  whole drafting pass) that raises the step's rate most, while one does. Each trial
   *  is costed from running sums, so a step with many requests stays cheap to plan. */
  choose(candidates: readonly AutoCandidate[], fixedRows: number, fixedTokens: number, rowBudget: number, fixedTrees = false): number[] {
    const depths = candidates.map(() => 0);
    const maxDepth = Math.max(0, ...candidates.map((c) => c.maxDepth));
    const growing = new Array<number>(maxDepth).fill(0);
    let tokens = fixedTokens + candidates.reduce((n, c) => n + c.acceptance.expectedTokens(0), 0);
    let rows = fixedRows + candidates.length;
    const rate = (t: number, r: number) =>
      t / (this.llm.at(r) * (growing[0] > 0 || fixedTrees ? this.treeOverhead : 1) + this.draftMsOf(growing));
    const none = rate(tokens, rows);
    let best = none;
    for (;;) {
      let pick = -1;
      let pickDepth = 0;
      candidates.forEach((c, i) => {
        const from = depths[i];
        const base = tokens - c.acceptance.expectedTokens(from);
        for (let d = from + 1; d <= c.maxDepth && rows + d - from <= rowBudget; d++) {
          growing[d - 1]++; // this chain now reaches past depth d - 1
          const r = rate(base + c.acceptance.expectedTokens(d), rows + d - from);
          if (r > best * 1.0001) {
            best = r;
            pick = i;
            pickDepth = d;
          }
        }
        for (let d = from + 1; d <= c.maxDepth && rows + d - from <= rowBudget; d++) growing[d - 1]--;
      });
      // Trees must beat no tree by a clear margin: the estimates behind them (t(L) under
      // a noisy machine, acceptance, requests finishing apart) err by several percent.
      if (pick < 0) return best >= none * (1 + REQUIRED_GAIN) ? depths : depths.fill(0);
      const c = candidates[pick];
      tokens += c.acceptance.expectedTokens(pickDepth) - c.acceptance.expectedTokens(depths[pick]);
      rows += pickDepth - depths[pick];
      for (let d = depths[pick]; d < pickDepth; d++) growing[d]++;
      depths[pick] = pickDepth;
    }
  }
}

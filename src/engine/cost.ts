// What a step costs and what a tree yields, measured rather than assumed: t(L), the
// LLM's forward time for L batch tokens, and the drafters' time per forward, measured
// at load over a grid of L and scaled by every step's observed times; acceptance by
// depth as decaying averages (per request, started from the engine-wide one). From
// these the scheduler picks, per request, the chain length that maximises the whole
// batch's expected tokens per second.

import { AcceptanceByDepth } from "./request";

/** Time (ms) as a function of batch tokens: the shape measured at load (linear between
 *  measured points), times a speed factor that every observed step refines. One factor
 *  for all sizes: the machine's speed drifts (other load, weights paged out and back)
 *  for every size alike, and points refined one by one, the often-seen sizes in one
 *  state of the machine and the rest in another, would disagree about what a tree of
 *  a few rows costs over a plain step. */
export class CostCurve {
  private readonly xs: number[];
  private readonly ms: number[];
  private speed = 1;

  constructor(points: { tokens: number; ms: number }[]) {
    if (points.length === 0) throw new Error("cost curve: no measurements");
    const sorted = [...points].sort((a, b) => a.tokens - b.tokens);
    this.xs = sorted.map((p) => p.tokens);
    // More tokens never take less time; a point measured above a larger size's time
    // caught a stall (timing noise only ever adds), so it takes that time.
    this.ms = sorted.map((p) => p.ms);
    for (let i = this.ms.length - 2; i >= 0; i--) this.ms[i] = Math.min(this.ms[i], this.ms[i + 1]);
  }

  at(tokens: number): number {
    return this.speed * this.shapeAt(tokens);
  }

  private shapeAt(tokens: number): number {
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

  /** Moves the speed factor a little towards an observed time (one stall counts at
   *  most three times the current factor). */
  observe(tokens: number, ms: number, weight = 0.05): void {
    const shape = this.shapeAt(tokens);
    if (shape > 0) this.speed += weight * (Math.min(ms / shape, 3 * this.speed) - this.speed);
  }

  get points(): { tokens: number; ms: number }[] {
    return this.xs.map((tokens) => ({ tokens, ms: Math.round(this.at(tokens) * 1000) / 1000 }));
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

/** Probes: chains of PROBE_DEPTH drafted for an auto request kept at no tree, at most
 *  one per step and each request at most every MIN_PROBE_INTERVAL steps, paid from a
 *  credit of PROBE_BUDGET of every step's time (so all probes together cost at most
 *  that share, however many requests wait for one), and only where a chain would pay
 *  were PROBE_IF_PAYS_AT of its nodes accepted (when even that loses, a full batch or a
 *  costly drafter, probing is waste). */
export const PROBE_DEPTH = 2;
const MIN_PROBE_INTERVAL = 8;
const PROBE_BUDGET = 0.02;
const PROBE_SAVING = 5000;
const PROBE_IF_PAYS_AT = 0.9;
/** Weight of one verified chain in the engine-wide acceptance (a request's own: 0.1):
 *  the engine-wide one speaks for all requests, so a few rejections should not sway it. */
const ENGINE_WEIGHT = 0.05;
/** Share of the way an idle auto request's estimate moves to the engine-wide one per step. */
const IDLE_RELAX = 1 / 16;

export class CostModel {
  /** Engine-wide acceptance by depth: the starting point of every new request's. */
  readonly acceptance: AcceptanceByDepth;
  /** Observed draft time over predicted SSM forward time (JS overhead per depth). */
  private draftOverhead = 1;
  /** Milliseconds of step time probes may still spend. */
  private probeCredit = 0;

  constructor(
    readonly llm: CostCurve,
    /** Summed over all SSMs; null without SSMs (drafting is then nearly free). */
    readonly drafter: CostCurve | null,
    maxDepth: number,
  ) {
    // A neutral prior: a chain of depth d pays while acceptance is high enough; the
    // first steps' observations replace it quickly.
    this.acceptance = new AcceptanceByDepth(Array(maxDepth).fill(0.6), ENGINE_WEIGHT);
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

  /** With the SSMs on a device of their own: whether verifying one half of the
   *  speculating requests while the SSMs draft the other half's trees beats drafting
   *  and verifying them all in each step. Every request advances once in two
   *  overlapped steps, max(draft(A), t(rows of B)) + max(draft(B), t(rows of A)), or
   *  in one step of draft(all) + t(all rows). `otherRows` (prefill chunks, plain
   *  decodes) are in every forward. Trees are costed by depth (one node per pass). */
  overlapPays(requests: readonly { depth: number; rows: number }[], otherRows: number): boolean {
    if (requests.length < 2) return false;
    const half = Math.ceil(requests.length / 2);
    const [a, b] = [requests.slice(0, half), requests.slice(half)];
    const rows = (rs: readonly { rows: number }[]) => rs.reduce((n, r) => n + r.rows, 0);
    const draft = (rs: readonly { depth: number }[]) => this.draftMs(rs.map((r) => r.depth));
    const serial = draft(requests) + this.llm.at(otherRows + rows(requests));
    const overlapped = Math.max(draft(a), this.llm.at(otherRows + rows(b))) + Math.max(draft(b), this.llm.at(otherRows + rows(a)));
    return overlapped < serial;
  }

  /** Whether an auto request kept at no tree for `steps` steps should draft a probe
   *  chain now, to refresh its acceptance estimate: a chain must pay on the measured
   *  curves were PROBE_IF_PAYS_AT of its nodes accepted (not on the estimate the probe
   *  exists to correct), and the credit must cover the probe's cost (catching the
   *  drafter up on `catchUp` tokens, drafting, the extra rows), which it then pays. */
  probe(steps: number, catchUp: number, rows: number, tokens: number): boolean {
    if (steps < MIN_PROBE_INTERVAL) return false;
    const draft = this.draftMsOf(Array(PROBE_DEPTH).fill(1));
    const chainTokens = tokens + new AcceptanceByDepth(Array(PROBE_DEPTH).fill(PROBE_IF_PAYS_AT)).expectedTokens(PROBE_DEPTH) - 1;
    const verify = this.llm.at(rows + PROBE_DEPTH);
    if (chainTokens / (verify + draft) < (tokens / this.llm.at(rows)) * (1 + REQUIRED_GAIN)) return false;
    // The probe's drafting: the catch-up pass, then one pass per further depth.
    const probeDraft = this.drafter ? (this.drafter.at(catchUp) + (PROBE_DEPTH - 1) * this.drafter.at(1)) * this.draftOverhead : 0;
    const cost = probeDraft + verify - this.llm.at(rows);
    if (cost > this.probeCredit) return false;
    this.probeCredit -= cost;
    return true;
  }

  /** A plain decode step of an auto request: its estimate gets no news, so it drifts
   *  back to the engine-wide one (a request that stopped drafting after a few
   *  rejections starts again when the others' acceptance says a chain pays). */
  observeIdle(acceptance: AcceptanceByDepth): void {
    acceptance.relaxToward(this.acceptance, IDLE_RELAX);
  }

  /** A step's forward time, trees or not: t(L) is the time of L rows whatever they
   *  hold. Each step adds its share to the probes' credit. */
  observeStep(tokens: number, ms: number): void {
    this.llm.observe(tokens, ms);
    // Saved up over at most PROBE_SAVING steps: a long stretch without probes (a full
    // batch) must not pay for a burst of them once it empties.
    this.probeCredit = Math.min(this.probeCredit + PROBE_BUDGET * ms, PROBE_SAVING * PROBE_BUDGET * ms);
  }

  observeDraft(depths: readonly number[], ms: number): void {
    const predicted = this.draftMs(depths) / this.draftOverhead;
    if (predicted > 0) this.draftOverhead += 0.1 * (Math.min(10, ms / predicted) - this.draftOverhead);
  }

  /** Chain length per candidate maximising expected tokens per second of the whole
   *  step, given `fixedRows` batch rows already taken (prefill chunks, fixed trees,
   *  plain decodes) and `fixedTokens` tokens those yield. Greedy: apply the one
   *  lengthening (of any request, by any number of nodes, since a first node pays the
   *  whole drafting pass) that raises the step's rate most, while one does. Each trial
   *  is costed from running sums, so a step with many requests stays cheap to plan. */
  choose(candidates: readonly AutoCandidate[], fixedRows: number, fixedTokens: number, rowBudget: number): number[] {
    const depths = candidates.map(() => 0);
    const maxDepth = Math.max(0, ...candidates.map((c) => c.maxDepth));
    const growing = new Array<number>(maxDepth).fill(0);
    let tokens = fixedTokens + candidates.reduce((n, c) => n + c.acceptance.expectedTokens(0), 0);
    let rows = fixedRows + candidates.length;
    const rate = (t: number, r: number) =>
      t / (this.llm.at(r) + this.draftMsOf(growing));
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

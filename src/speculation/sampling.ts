// Logits -> next-token distribution, and drawing from it. The LLM (incremental decode
// and verification) and the drafters process logits with this one function, so the
// distribution speculative sampling preserves is exactly the incremental one.

import type { Rng } from "./rng.ts";

export interface SamplingParams {
  /** 0 = greedy (argmax). */
  temperature: number;
  /** Keep the k most likely tokens; 0 = off. */
  topK: number;
  /** Keep the smallest set of most likely tokens whose mass is >= topP; 1 = off. */
  topP: number;
  /** Drop tokens with probability < minP * (largest probability); 0 = off. */
  minP: number;
  /** HF-style penalty on tokens already in the context; 1 = off. */
  repetitionPenalty: number;
  /** OpenAI-style: subtracted once from the logit of every token in the context; 0 = off. */
  presencePenalty?: number;
  /** OpenAI-style: subtracted per occurrence in the context; 0 = off. */
  frequencyPenalty?: number;
  /** Token id -> value added to its logit (OpenAI's logit_bias). */
  logitBias?: ReadonlyMap<number, number>;
}

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 };

/** Fills defaults (every filter off, temperature 1) and rejects values out of range. */
export function samplingParams(given: Partial<SamplingParams> = {}): SamplingParams {
  const params: SamplingParams = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, ...given };
  const fail = (name: string, rule: string) => {
    throw new Error(`sampling: ${name} must be ${rule}, got ${params[name as keyof SamplingParams]}`);
  };
  if (!(params.temperature >= 0) || !Number.isFinite(params.temperature)) fail("temperature", "a finite number >= 0");
  if (!Number.isInteger(params.topK) || params.topK < 0) fail("topK", "an integer >= 0");
  if (!(params.topP > 0 && params.topP <= 1)) fail("topP", "in (0, 1]");
  if (!(params.minP >= 0 && params.minP <= 1)) fail("minP", "in [0, 1]");
  if (!(params.repetitionPenalty > 0) || !Number.isFinite(params.repetitionPenalty)) fail("repetitionPenalty", "a finite number > 0");
  return params;
}

export function isGreedy(params: SamplingParams): boolean {
  return params.temperature === 0;
}

/** Index of the largest value; the lowest index on ties. */
export function argmax(row: ArrayLike<number>): number {
  let best = 0;
  let bestValue = row[0];
  for (let i = 1; i < row.length; i++) {
    if (row[i] > bestValue) {
      bestValue = row[i];
      best = i;
    }
  }
  return best;
}

/** Indices of the k largest values, largest first, lower index first on ties.
 *  A size-k min-heap over the row: O(n log k), no full sort. */
export function topIndices(row: ArrayLike<number>, k: number): Int32Array {
  const count = Math.min(k, row.length);
  const heap = new Int32Array(count);
  // `worse(a, b)`: a ranks below b. The heap root is the worst kept index.
  const worse = (a: number, b: number) => row[a] < row[b] || (row[a] === row[b] && a > b);
  const siftDown = (size: number) => {
    let at = 0;
    for (;;) {
      const left = 2 * at + 1;
      if (left >= size) return;
      const right = left + 1;
      const child = right < size && worse(heap[right], heap[left]) ? right : left;
      if (!worse(heap[child], heap[at])) return;
      const swap = heap[at];
      heap[at] = heap[child];
      heap[child] = swap;
      at = child;
    }
  };
  for (let i = 0; i < count; i++) {
    heap[i] = i;
    for (let at = i; at > 0; ) {
      const up = (at - 1) >> 1;
      if (!worse(heap[at], heap[up])) break;
      const swap = heap[at];
      heap[at] = heap[up];
      heap[up] = swap;
      at = up;
    }
  }
  // Scanning upwards, an equal value has a higher index, hence ranks lower: strict >.
  for (let i = count; i < row.length; i++) {
    if (row[i] > row[heap[0]]) {
      heap[0] = i;
      siftDown(count);
    }
  }
  // Popping the worst to the back leaves the heap sorted best-first.
  for (let size = count - 1; size > 0; size--) {
    const swap = heap[0];
    heap[0] = heap[size];
    heap[size] = swap;
    siftDown(size);
  }
  return heap;
}

/** HF repetition penalty: every token of `context` gets logit / penalty when positive,
 *  logit * penalty otherwise. Reads the original row, so repeated tokens count once. */
export function penalize(logits: Float32Array, context: ArrayLike<number>, penalty: number): Float32Array {
  const out = logits.slice();
  for (let i = 0; i < context.length; i++) {
    const token = context[i];
    const logit = logits[token];
    out[token] = logit > 0 ? logit / penalty : logit * penalty;
  }
  return out;
}

/** OpenAI's presence and frequency penalties: logit -= presence * [count > 0] + frequency * count. */
export function penalizeCounts(logits: Float32Array, context: ArrayLike<number>, presence: number, frequency: number): Float32Array {
  const counts = new Map<number, number>();
  for (let i = 0; i < context.length; i++) counts.set(context[i], (counts.get(context[i]) ?? 0) + 1);
  const out = logits.slice();
  for (const [token, count] of counts) out[token] -= presence + frequency * count;
  return out;
}

/** Whether the next-token distribution depends on the tokens before it (penalties). */
export function readsContext(params: SamplingParams): boolean {
  return params.repetitionPenalty !== 1 || (params.presencePenalty ?? 0) !== 0 || (params.frequencyPenalty ?? 0) !== 0;
}

/** `logits` with NaN read as -inf: a NaN logit is never picked (as si_sample does). */
function withoutNaN(logits: Float32Array): Float32Array {
  let row = logits;
  for (let i = 0; i < logits.length; i++) {
    if (logits[i] !== logits[i]) {
      if (row === logits) row = logits.slice();
      row[i] = -Infinity;
    }
  }
  return row;
}

/** The logits every rule of `params` reads: NaN as -inf, penalties over `context`, then
 *  the logit bias. */
function penalized(logits: Float32Array, params: SamplingParams, context?: ArrayLike<number>): Float32Array {
  let row = withoutNaN(logits);
  const hasContext = context !== undefined && context.length > 0;
  if (hasContext && params.repetitionPenalty !== 1) row = penalize(row, context, params.repetitionPenalty);
  const presence = params.presencePenalty ?? 0;
  const frequency = params.frequencyPenalty ?? 0;
  if (hasContext && (presence !== 0 || frequency !== 0)) row = penalizeCounts(row, context, presence, frequency);
  if (params.logitBias && params.logitBias.size > 0) {
    if (row === logits) row = logits.slice();
    for (const [token, bias] of params.logitBias) if (token >= 0 && token < row.length) row[token] += bias;
  }
  return row;
}

/** The token greedy decoding picks: argmax after the repetition penalty. */
export function greedyToken(logits: Float32Array, params: SamplingParams, context?: ArrayLike<number>): number {
  return argmax(penalized(logits, params, context));
}

/** Pops indices from a max-heap of positive weights until `mass` is covered:
 *  the most likely tokens in order, without sorting the whole vocabulary. */
function heaviestCovering(weights: Float32Array, mass: number): number[] {
  const heap: number[] = [];
  for (let i = 0; i < weights.length; i++) if (weights[i] > 0) heap.push(i);
  const better = (a: number, b: number) => weights[a] > weights[b] || (weights[a] === weights[b] && a < b);
  const siftDown = (at: number) => {
    const size = heap.length;
    for (;;) {
      const left = 2 * at + 1;
      if (left >= size) return;
      const right = left + 1;
      const child = right < size && better(heap[right], heap[left]) ? right : left;
      if (!better(heap[child], heap[at])) return;
      const swap = heap[at];
      heap[at] = heap[child];
      heap[child] = swap;
      at = child;
    }
  };
  for (let at = (heap.length >> 1) - 1; at >= 0; at--) siftDown(at);
  const taken: number[] = [];
  let covered = 0;
  while (heap.length > 0 && (taken.length === 0 || covered < mass)) {
    const top = heap[0];
    taken.push(top);
    covered += weights[top];
    const last = heap.pop()!;
    if (heap.length > 0) {
      heap[0] = last;
      siftDown(0);
    }
  }
  return taken;
}

/** One row of logits -> probabilities: repetition penalty (over `context`), temperature,
 *  softmax, top-k, top-p, min-p, renormalized. Greedy gives a one-hot row. */
export function processLogits(logits: Float32Array, params: SamplingParams, context?: ArrayLike<number>): Float32Array {
  const vocab = logits.length;
  const row = penalized(logits, params, context);
  const probs = new Float32Array(vocab);
  if (params.temperature === 0) {
    probs[argmax(row)] = 1;
    return probs;
  }
  const invTemperature = 1 / params.temperature;
  const limitK = params.topK > 0 && params.topK < vocab;
  const limitP = params.topP < 1;

  if (!limitK && !limitP) {
    // No ordering needed: weights relative to the top token, whose weight is exactly 1.
    const max = row[argmax(row)];
    if (max === -Infinity) throw new Error("sampling: every logit is -Infinity");
    let total = 0;
    for (let i = 0; i < vocab; i++) {
      const weight = Math.exp((row[i] - max) * invTemperature);
      probs[i] = weight >= params.minP ? weight : 0;
      total += probs[i];
    }
    for (let i = 0; i < vocab; i++) probs[i] /= total;
    return probs;
  }

  // Otherwise the kept tokens are a prefix of the tokens ranked by probability.
  let ranked: ArrayLike<number>;
  let weights: ArrayLike<number>;
  let total = 0;
  if (limitK) {
    ranked = topIndices(row, params.topK);
    const exact = new Float64Array(ranked.length);
    weights = exact;
    const max = row[ranked[0]];
    if (max === -Infinity) throw new Error("sampling: every logit is -Infinity");
    for (let j = 0; j < ranked.length; j++) total += exact[j] = Math.exp((row[ranked[j]] - max) * invTemperature);
  } else {
    const max = row[argmax(row)];
    if (max === -Infinity) throw new Error("sampling: every logit is -Infinity");
    for (let i = 0; i < vocab; i++) {
      probs[i] = Math.exp((row[i] - max) * invTemperature);
      total += probs[i];
    }
    ranked = heaviestCovering(probs, params.topP * total);
    weights = Float32Array.from(ranked, (token) => probs[token]);
    probs.fill(0);
  }
  const nucleus = params.topP * total;
  let kept = 0;
  let covered = 0;
  const floor = params.minP * weights[0];
  while (kept < ranked.length && (kept === 0 || covered < nucleus) && weights[kept] >= floor) {
    covered += weights[kept];
    kept++;
  }
  for (let j = 0; j < kept; j++) probs[ranked[j]] = weights[j] / covered;
  return probs;
}

/** Draws an index with probability proportional to `probs` (need not sum to 1). */
export function sample(probs: ArrayLike<number>, rng: Rng): number {
  return sampleAt(probs, rng.next());
}

/** The index whose cumulative interval holds `u * total` (inverse CDF): `u` uniform in
 *  [0, 1) draws from `probs`. */
export function sampleAt(probs: ArrayLike<number>, u: number): number {
  let total = 0;
  for (let i = 0; i < probs.length; i++) total += probs[i];
  if (!(total > 0)) throw new Error("sampling: the distribution has no mass");
  const target = u * total;
  let cumulative = 0;
  let last = -1;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] <= 0) continue;
    cumulative += probs[i];
    if (target < cumulative) return i;
    last = i;
  }
  return last; // rounding left the target just past the end
}

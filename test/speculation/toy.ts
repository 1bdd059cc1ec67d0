// Toy models and statistics for the speculation tests: an "LLM" and "SSMs" that are
// pure functions of the context over a tiny vocabulary, a forward pass that reads its
// contexts from a TokenBatch's positions and ancestor masks (so it checks linearize),
// and a chi-square goodness-of-fit p-value.

import type { TokenBatch } from "../../src/model/batch.ts";
import { Rng } from "../../src/speculation/rng.ts";

/** Seeded logits per context: the same context always gives the same row. */
export class ToyModel {
  private readonly cache = new Map<string, Float32Array>();

  /** `base`, when given, is followed with `noise` added: a draft model near the LLM. */
  constructor(
    readonly vocab: number,
    private readonly seed: number,
    private readonly scale: number,
    private readonly base?: ToyModel,
  ) {}

  logits(context: ArrayLike<number>): Float32Array {
    const key = Array.prototype.join.call(context, ",");
    let row = this.cache.get(key);
    if (!row) {
      let hash = this.seed >>> 0;
      for (let i = 0; i < context.length; i++) hash = Math.imul(hash ^ (context[i] + 1), 0x01000193) >>> 0;
      const rng = new Rng(hash * 65536 + context.length);
      const own = Float32Array.from({ length: this.vocab }, () => this.scale * (rng.next() + rng.next() + rng.next() - 1.5));
      row = this.base ? Float32Array.from(own, (noise, i) => this.base!.logits(context)[i] + noise) : own;
      this.cache.set(key, row);
    }
    return row;
  }
}

/** Logits for every row of `batch` wanting them: each row's context is its sequence's
 *  committed tokens followed by the batch tokens its ancestor mask holds, which must
 *  sit at consecutive positions and slots (plain throws: this runs ~10^5 times). */
export function toyForward(model: ToyModel, batch: TokenBatch, committed: number[][]): Float32Array {
  const out = new Float32Array(batch.logitRows.length * model.vocab);
  const rowStart = new Map<number, number>();
  for (let i = 0; i < batch.n; i++) if (!rowStart.has(batch.seq[i])) rowStart.set(batch.seq[i], i);
  batch.logitRows.forEach((i, r) => {
    const seq = batch.seq[i];
    const start = rowStart.get(seq)!;
    const context = [...committed[seq]];
    for (let j = 0; j <= i - start; j++) {
      if ((batch.ancestors[i * batch.words + (j >> 5)] >>> (j & 31)) & 1) {
        if (batch.positions[start + j] !== context.length || batch.slot[start + j] !== committed[seq].length + j) {
          throw new Error(`toyForward: batch token ${start + j} is not at the next position and slot of row ${i}'s context`);
        }
        context.push(batch.tokens[start + j]);
      }
    }
    if (context.length !== batch.positions[i] + 1) throw new Error(`toyForward: row ${i} does not attend to itself last`);
    out.set(model.logits(context), r * model.vocab);
  });
  return out;
}

/** Upper tail of the standard normal (Abramowitz & Stegun 26.2.17, error < 7.5e-8). */
function normalUpperTail(z: number): number {
  if (z < 0) return 1 - normalUpperTail(-z);
  const t = 1 / (1 + 0.2316419 * z);
  const poly = t * (0.31938153 + t * (-0.356563782 + t * (1.781477937 + t * (-1.821255978 + t * 1.330274429))));
  return (Math.exp((-z * z) / 2) / Math.sqrt(2 * Math.PI)) * poly;
}

/** P(chi-square with `df` degrees of freedom >= x), by Wilson-Hilferty. */
export function chiSquareTail(x: number, df: number): number {
  const v = 2 / (9 * df);
  return normalUpperTail((Math.cbrt(x / df) - (1 - v)) / Math.sqrt(v));
}

export interface FitResult {
  statistic: number;
  df: number;
  pValue: number;
}

/** Pearson goodness of fit of `observed` counts to `expected` probabilities. Cells
 *  expected below 5 counts are pooled; a count where none is expected fails outright. */
export function chiSquareFit(observed: ArrayLike<number>, expected: ArrayLike<number>): FitResult {
  let total = 0;
  for (let i = 0; i < observed.length; i++) total += observed[i];
  let statistic = 0;
  let cells = 0;
  let pooledObserved = 0;
  let pooledExpected = 0;
  for (let i = 0; i < observed.length; i++) {
    const e = expected[i] * total;
    if (e === 0 && observed[i] > 0) return { statistic: Infinity, df: 1, pValue: 0 };
    if (e < 5) {
      pooledObserved += observed[i];
      pooledExpected += e;
      continue;
    }
    statistic += (observed[i] - e) ** 2 / e;
    cells++;
  }
  if (pooledExpected > 0) {
    statistic += (pooledObserved - pooledExpected) ** 2 / pooledExpected;
    cells++;
  }
  const df = Math.max(1, cells - 1);
  return { statistic, df, pValue: chiSquareTail(statistic, df) };
}

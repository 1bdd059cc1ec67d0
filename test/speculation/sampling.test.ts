// Sampling: the seeded RNG, logits processing against a plain full-sort reference,
// edge cases of the filters, and the sampler's empirical distribution.

import { describe, expect, test } from "bun:test";
import { Rng } from "../../src/speculation/rng.ts";
import {
  GREEDY, argmax, greedyToken, penalize, processLogits, sample, samplingParams, topIndices, type SamplingParams,
} from "../../src/speculation/sampling.ts";
import { chiSquareFit } from "./toy.ts";

/** The filters spelled out with a full sort: what processLogits must equal. */
function referenceProbs(logits: Float32Array, params: SamplingParams, context: number[] = []): number[] {
  const row = Array.from(logits);
  if (params.repetitionPenalty !== 1) {
    for (const t of new Set(context)) row[t] = logits[t] > 0 ? logits[t] / params.repetitionPenalty : logits[t] * params.repetitionPenalty;
  }
  const out = row.map(() => 0);
  if (params.temperature === 0) {
    out[argmax(row)] = 1;
    return out;
  }
  const max = Math.max(...row);
  const weights = row.map((l) => Math.exp((l - max) / params.temperature));
  let ranked = row.map((_, i) => i).sort((a, b) => weights[b] - weights[a] || a - b);
  if (params.topK > 0) ranked = ranked.slice(0, params.topK);
  const total = ranked.reduce((s, i) => s + weights[i], 0);
  let covered = 0;
  let nucleus = 0;
  while (nucleus < ranked.length && (nucleus === 0 || covered < params.topP * total)) covered += weights[ranked[nucleus++]];
  ranked = ranked.slice(0, nucleus).filter((i) => weights[i] >= params.minP * weights[ranked[0]]);
  const kept = ranked.reduce((s, i) => s + weights[i], 0);
  for (const i of ranked) out[i] = weights[i] / kept;
  return out;
}

function logitsOf(probs: number[]): Float32Array {
  return Float32Array.from(probs, (p) => (p > 0 ? Math.log(p) : -Infinity));
}

function kept(probs: Float32Array): number[] {
  return Array.from(probs.keys()).filter((i) => probs[i] > 0);
}

describe("Rng", () => {
  test("same seed, same stream; other seeds, other streams", () => {
    const draw = (seed: number) => Array.from({ length: 8 }, ((rng) => () => rng.next())(new Rng(seed)));
    expect(draw(42)).toEqual(draw(42));
    expect(draw(42)).not.toEqual(draw(43));
    expect(draw(2 ** 40)).not.toEqual(draw(2 ** 40 + 2 ** 33));
  });

  test("uniform in [0, 1)", () => {
    const rng = new Rng(7);
    const bins = new Array(10).fill(0);
    for (let i = 0; i < 50_000; i++) {
      const u = rng.next();
      expect(u >= 0 && u < 1).toBe(true);
      bins[Math.floor(u * 10)]++;
    }
    expect(chiSquareFit(bins, new Array(10).fill(0.1)).pValue).toBeGreaterThan(1e-4);
  });

  test("rejects seeds a double cannot hold", () => {
    expect(() => new Rng(2 ** 60)).toThrow("safe integer");
  });
});

describe("processLogits", () => {
  test("argmax and topIndices break ties toward the lowest index", () => {
    expect(argmax([1, 3, 3, 2])).toBe(1);
    expect(Array.from(topIndices([1, 3, 3, 2, 3], 3))).toEqual([1, 2, 4]);
    expect(Array.from(topIndices([5, 1], 4))).toEqual([0, 1]);
    const rng = new Rng(3);
    for (let trial = 0; trial < 50; trial++) {
      const row = Array.from({ length: 200 }, () => Math.floor(rng.next() * 20));
      const k = 1 + Math.floor(rng.next() * 40);
      const sorted = row.map((_, i) => i).sort((a, b) => row[b] - row[a] || a - b);
      expect(Array.from(topIndices(row, k))).toEqual(sorted.slice(0, k));
    }
  });

  test("matches the full-sort reference on random rows and settings", () => {
    const rng = new Rng(11);
    for (let trial = 0; trial < 300; trial++) {
      const vocab = 2 + Math.floor(rng.next() * 300);
      // Coarse logits make ties, which both must break the same way.
      const logits = Float32Array.from({ length: vocab }, () => Math.round(rng.next() * 12 - 6) / 2);
      const params = samplingParams({
        temperature: [0, 0.3, 1, 2][trial % 4],
        topK: [0, 1, 5, 40, vocab + 3][Math.floor(rng.next() * 5)],
        topP: [1, 0.9, 0.5, 0.05][Math.floor(rng.next() * 4)],
        minP: [0, 0.05, 0.3][Math.floor(rng.next() * 3)],
        repetitionPenalty: [1, 1.3][Math.floor(rng.next() * 2)],
      });
      const context = Array.from({ length: 6 }, () => Math.floor(rng.next() * vocab));
      const got = processLogits(logits, params, context);
      const want = referenceProbs(logits, params, context);
      for (let i = 0; i < vocab; i++) expect(got[i]).toBeCloseTo(want[i], 6);
    }
  });

  test("top-p keeps the smallest set reaching the mass, never nothing", () => {
    const logits = logitsOf([0.5, 0.3, 0.15, 0.05]);
    const params = (topP: number) => samplingParams({ topP });
    expect(kept(processLogits(logits, params(0.7)))).toEqual([0, 1]);
    expect(kept(processLogits(logits, params(0.81)))).toEqual([0, 1, 2]);
    expect(kept(processLogits(logits, params(1e-6)))).toEqual([0]);
    const renormalized = processLogits(logits, params(0.7));
    expect(renormalized[0]).toBeCloseTo(0.625, 6);
  });

  test("top-k, min-p and their combination", () => {
    const logits = logitsOf([0.4, 0.3, 0.2, 0.1]);
    expect(kept(processLogits(logits, samplingParams({ topK: 2 })))).toEqual([0, 1]);
    expect(kept(processLogits(logits, samplingParams({ topK: 1 })))).toEqual([0]);
    // min-p 0.45: tokens below 0.45 * 0.4 = 0.18 go.
    expect(kept(processLogits(logits, samplingParams({ minP: 0.45 })))).toEqual([0, 1, 2]);
    expect(kept(processLogits(logits, samplingParams({ minP: 1 })))).toEqual([0]);
    expect(kept(processLogits(logits, samplingParams({ topK: 3, topP: 0.5, minP: 0.1 })))).toEqual([0, 1]);
    // Masked tokens stay impossible.
    expect(kept(processLogits(logitsOf([0.5, 0, 0.5]), samplingParams({})))).toEqual([0, 2]);
  });

  test("temperature 0 is greedy; the repetition penalty follows HF", () => {
    const logits = Float32Array.from([2, 2.5, -1, 0.5]);
    expect(Array.from(processLogits(logits, GREEDY))).toEqual([0, 1, 0, 0]);
    // 2.5 / 2 < 2: the penalty on token 1 hands the argmax to token 0.
    const params = { ...GREEDY, repetitionPenalty: 2 };
    expect(greedyToken(logits, params, [1, 1, 2])).toBe(0);
    expect(Array.from(penalize(logits, [1, 1, 2], 2))).toEqual([2, 1.25, -2, 0.5]);
  });

  test("bad parameters are refused by name", () => {
    expect(() => samplingParams({ topP: 0 })).toThrow("topP");
    expect(() => samplingParams({ topK: 1.5 })).toThrow("topK");
    expect(() => samplingParams({ temperature: -1 })).toThrow("temperature");
    expect(() => samplingParams({ minP: 2 })).toThrow("minP");
    expect(() => samplingParams({ repetitionPenalty: 0 })).toThrow("repetitionPenalty");
  });

  test("large vocabularies: top-k and nucleus without a full sort", () => {
    const rng = new Rng(5);
    const logits = Float32Array.from({ length: 150_000 }, () => rng.next() * 20);
    const start = performance.now();
    const topK = processLogits(logits, samplingParams({ topK: 50, topP: 0.9 }));
    const nucleus = processLogits(logits, samplingParams({ topP: 0.5 }));
    const elapsed = performance.now() - start;
    expect(kept(topK).length).toBeLessThanOrEqual(50);
    const mass = kept(nucleus).reduce((s, i) => s + Math.exp(logits[i] - 20), 0);
    expect(mass).toBeGreaterThan(0);
    expect(elapsed).toBeLessThan(1000);
  });
});

describe("sample", () => {
  const logits = Float32Array.from([1.2, 0.3, -0.5, 2, 0.9, -1.4, 0.1, 1.7, -0.2, 0.6]);
  const settings: Partial<SamplingParams>[] = [
    { temperature: 1 },
    { temperature: 0.7, topK: 4 },
    { temperature: 1.3, topP: 0.8 },
    { temperature: 1, minP: 0.2 },
    { temperature: 0.9, topK: 6, topP: 0.9, minP: 0.1 },
  ];
  for (const setting of settings) {
    test(`20k draws follow processLogits: ${JSON.stringify(setting)}`, () => {
      const probs = processLogits(logits, samplingParams(setting));
      const rng = new Rng(99);
      const counts = new Array(logits.length).fill(0);
      for (let i = 0; i < 20_000; i++) counts[sample(probs, rng)]++;
      const fit = chiSquareFit(counts, probs);
      expect(fit.pValue).toBeGreaterThan(1e-4);
    });
  }

  test("the same seed draws the same tokens", () => {
    const probs = processLogits(logits, samplingParams({}));
    const draws = (seed: number) => Array.from({ length: 32 }, ((rng) => () => sample(probs, rng))(new Rng(seed)));
    expect(draws(1)).toEqual(draws(1));
    expect(draws(1)).not.toEqual(draws(2));
  });

  test("a distribution without mass is refused", () => {
    expect(() => sample([0, 0], new Rng(1))).toThrow("no mass");
  });
});

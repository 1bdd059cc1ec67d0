// si_sample and si_tree_accept (through NativeSampler) against their TypeScript oracles
// in src/speculation/sampling.ts and verify.ts, on random logits (fast-check): greedy
// picks with ties, -inf, NaN, penalties and bias equal greedyToken; sampled rows give
// processLogits' distribution and draw what sampleAt(.., uniformAt(seed, position))
// draws; the native tree walk accepts what verify accepts; bad input is refused by name;
// a forward's logits are sampled on its device, as they would be from their host copy.

import { afterAll, describe, expect, test } from "bun:test";
import fc from "fast-check";
import { join } from "node:path";
import { BackendError } from "../../src/backend/backend.ts";
import { CpuBackend } from "../../src/backend/cpu.ts";
import { createKVCache } from "../../src/kv/cache.ts";
import { BatchBuilder } from "../../src/model/batch.ts";
import { loadModel } from "../../src/model/registry.ts";
import { uniformAt } from "../../src/speculation/rng.ts";
import { NativeSampler, requestRows, type SampleRow } from "../../src/speculation/sampler.ts";
import { greedyToken, processLogits, type SamplingParams } from "../../src/speculation/sampling.ts";
import { mergeTrees, type DraftTree } from "../../src/speculation/tree.ts";
import { verify } from "../../src/speculation/verify.ts";

const simd = CpuBackend.create({ threads: 2 });
const ref = CpuBackend.create({ threads: 1, reference: true });
const samplers = new Map<string, NativeSampler>();
afterAll(() => {
  for (const s of samplers.values()) s.close();
  simd.close();
  ref.close();
});

function samplerFor(backend: CpuBackend, vocab: number): NativeSampler {
  const key = `${backend === ref ? "ref" : "simd"}:${vocab}`;
  let s = samplers.get(key);
  if (!s) samplers.set(key, (s = new NativeSampler(backend, vocab)));
  return s;
}

/** Picks one token per row, each row its own one-row tree. */
function pickRows(backend: CpuBackend, logits: Float32Array, vocab: number, rows: SampleRow[]): number[] {
  const trees = rows.map(() => ({ parents: Int32Array.of(-1), tokens: Int32Array.of(0) }));
  return samplerFor(backend, vocab).step(logits, rows, trees).map((o) => o.bonus);
}

/** TS oracle of one row: the token, or -1 when it has no mass. */
function oracleToken(row: Float32Array, params: SamplingParams, context: number[], seed: number, position: number): number {
  if (params.temperature === 0) return greedyToken(row, params, context);
  try {
    return sampleAtOrThrow(processLogits(row, params, context), uniformAt(seed, position));
  } catch {
    return -1;
  }
}

function sampleAtOrThrow(probs: Float32Array, u: number): number {
  let total = 0;
  for (const p of probs) total += p;
  if (!(total > 0)) throw new Error("no mass");
  const target = u * total;
  let cumulative = 0;
  let last = -1;
  for (let i = 0; i < probs.length; i++) {
    if (!(probs[i] > 0)) continue;
    cumulative += probs[i];
    if (target < cumulative) return i;
    last = i;
  }
  return last;
}

/** Whether u lies within `tol` (relative) of a boundary of probs' cumulative distribution:
 *  there, exp's last bit may move the draw to a neighbour. */
function nearBoundary(probs: Float32Array, u: number, tol = 1e-6): boolean {
  let total = 0;
  for (const p of probs) total += p;
  let cumulative = 0;
  for (const p of probs) {
    cumulative += p;
    if (p > 0 && Math.abs(cumulative / total - u) < tol) return true;
  }
  return false;
}

// Logits drawn from few values so ties are common; -inf and NaN included.
const logitValue = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(-2, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3) },
  { weight: 6, arbitrary: fc.float({ min: -8, max: 8, noNaN: true }) },
  { weight: 1, arbitrary: fc.constant(-Infinity) },
  { weight: 1, arbitrary: fc.constant(Number.NaN) },
);

interface Case {
  vocab: number;
  logits: number[];
  params: SamplingParams;
  context: number[];
  seed: number;
  position: number;
}

function caseOf(greedy: boolean): fc.Arbitrary<Case> {
  return fc.integer({ min: 1, max: 200 }).chain((vocab) =>
    fc.record({
      vocab: fc.constant(vocab),
      logits: fc.array(logitValue, { minLength: vocab, maxLength: vocab }),
      params: fc.record({
        temperature: greedy ? fc.constant(0) : fc.oneof(fc.constant(1), fc.double({ min: 0.05, max: 3, noNaN: true })),
        topK: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: vocab + 2 })),
        topP: fc.oneof(fc.constant(1), fc.constant(1e-9), fc.double({ min: 0.01, max: 1, noNaN: true })),
        minP: fc.oneof(fc.constant(0), fc.constant(1), fc.double({ min: 0, max: 1, noNaN: true })),
        repetitionPenalty: fc.oneof(fc.constant(1), fc.double({ min: 0.5, max: 2, noNaN: true })),
        presencePenalty: fc.oneof(fc.constant(0), fc.double({ min: -2, max: 2, noNaN: true })),
        frequencyPenalty: fc.oneof(fc.constant(0), fc.double({ min: -2, max: 2, noNaN: true })),
        logitBias: fc
          .array(fc.tuple(fc.integer({ min: -1, max: vocab }), fc.double({ min: -100, max: 100, noNaN: true })), { maxLength: 4 })
          .map((pairs) => new Map(pairs)),
      }),
      context: fc.array(fc.integer({ min: 0, max: vocab - 1 }), { maxLength: 12 }),
      seed: fc.oneof(fc.integer(), fc.constantFrom(-1, 2 ** 32 + 5, -(2 ** 40), 2 ** 53 - 1)),
      position: fc.oneof(fc.nat(), fc.constant(2 ** 33 + 7)),
    }),
  );
}

function runCase(c: Case, backend: CpuBackend): { native: number; oracle: number; row: Float32Array } {
  const row = Float32Array.from(c.logits);
  const step = requestRows(c.params, c.seed, c.context, null);
  // requestRows' root draws at context.length; the case's position replaces it.
  step.rows[0].position = c.position;
  const native = pickRows(backend, row, c.vocab, step.rows)[0];
  return { native, oracle: oracleToken(row, c.params, c.context, c.seed, c.position), row };
}

describe("si_sample against sampling.ts", () => {
  test("greedy picks equal greedyToken (ties to the lowest index, NaN never, penalties and bias applied)", () => {
    fc.assert(
      fc.property(caseOf(true), (c) => {
        for (const backend of [simd, ref]) {
          const { native, oracle } = runCase(c, backend);
          expect(native).toBe(oracle);
        }
      }),
      { numRuns: 300 },
    );
  });

  test("sampled rows have processLogits' distribution and draw its token (but on a CDF boundary)", () => {
    fc.assert(
      fc.property(caseOf(false), (c) => {
        const { native, oracle, row } = runCase(c, simd);
        if (oracle < 0) {
          expect(native).toBe(-1);
          return;
        }
        const want = processLogits(row, c.params, c.context);
        const got = samplerFor(simd, c.vocab).probsRow(0);
        for (let i = 0; i < c.vocab; i++) expect(Math.abs(got[i] - want[i])).toBeLessThanOrEqual(1e-6 * Math.max(1, want[i]));
        if (native !== oracle) expect(nearBoundary(want, uniformAt(c.seed, c.position))).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  test("the scalar reference and SIMD kernels pick the same tokens", () => {
    fc.assert(
      fc.property(caseOf(false), (c) => {
        expect(runCase(c, ref).native).toBe(runCase(c, simd).native);
      }),
      { numRuns: 100 },
    );
  });

  test("the draw is uniformAt(seed, position): a flat row over 4096 tokens picks floor(u * 4096)", () => {
    const vocab = 4096;
    const row = new Float32Array(vocab);
    const params: SamplingParams = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 };
    const seeds = [0, 1, -1, 42, 2 ** 32, 2 ** 32 + 1, -(2 ** 45), 2 ** 53 - 1];
    const rows: SampleRow[] = seeds.flatMap((seed) => [0, 1, 7, 2 ** 31, 2 ** 40].map((position) => ({ params, counts: null, seed, position })));
    const logits = new Float32Array(rows.length * vocab);
    rows.forEach((_, r) => logits.set(row, r * vocab));
    const got = pickRows(simd, logits, vocab, rows);
    expect(got).toEqual(rows.map((r) => Math.floor(uniformAt(r.seed, r.position) * vocab)));
  });

  test("top-p edge cases: a tiny top_p keeps the top token, ties at the nucleus edge go to the lower index", () => {
    const vocab = 8;
    const row = Float32Array.from([1, 3, 3, 2, 3, -Infinity, Number.NaN, 0]);
    const cases: Partial<SamplingParams>[] = [{ topP: 1e-9 }, { topP: 0.34 }, { topP: 0.5, topK: 2 }, { minP: 1 }, { topK: 1 }, { topP: 0.999999 }];
    for (const extra of cases) {
      const params: SamplingParams = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, ...extra };
      for (let position = 0; position < 40; position++) {
        const got = pickRows(simd, row, vocab, [{ params, counts: null, seed: 9, position }])[0];
        const want = processLogits(row, params);
        const probs = samplerFor(simd, vocab).probsRow(0);
        for (let i = 0; i < vocab; i++) expect(Math.abs(probs[i] - want[i])).toBeLessThanOrEqual(1e-7);
        if (got !== oracleToken(row, params, [], 9, position)) expect(nearBoundary(want, uniformAt(9, position))).toBe(true);
      }
    }
  });

  test("a row with no mass gives -1 (every logit -inf; a penalty that overflows to +inf twice)", () => {
    const vocab = 4;
    const params: SamplingParams = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1e-300 };
    const rows: SampleRow[] = [
      { params, counts: null, seed: 1, position: 0 },
      { params, counts: new Map([[0, 1], [1, 1]]), seed: 1, position: 0 },
    ];
    const logits = Float32Array.from([-Infinity, -Infinity, Number.NaN, -Infinity, 1, 2, 0, 0]);
    expect(pickRows(simd, logits, vocab, rows)).toEqual([-1, -1]);
    expect(oracleToken(logits.subarray(4), params, [0, 1], 1, 0)).toBe(-1);
  });
});

describe("si_tree_accept against verify.ts", () => {
  const treeCase = fc.record({
    vocab: fc.integer({ min: 2, max: 12 }),
    seed: fc.integer(),
    drafts: fc.array(
      fc.array(fc.tuple(fc.integer({ min: 0, max: 11 }), fc.integer({ min: -1, max: 20 })), { minLength: 1, maxLength: 20 }),
      { minLength: 1, maxLength: 3 },
    ),
    sampled: fc.boolean(),
    context: fc.array(fc.integer({ min: 0, max: 11 }), { minLength: 1, maxLength: 6 }),
    repetition: fc.constantFrom(1, 1.3),
  });

  test("the native walk accepts the path verify accepts (greedy and per-position draws), on ties too", () => {
    fc.assert(
      fc.property(treeCase, (c) => {
        const drafts: DraftTree[] = c.drafts.map((nodes) => ({
          tokens: Int32Array.from(nodes, ([t]) => t % c.vocab),
          parents: Int32Array.from(nodes, ([, p], i) => (p < i ? p : -1)),
          sampled: false,
        }));
        const tree = mergeTrees(drafts);
        const rowsCount = tree.size + 1;
        // Few distinct values: argmax ties are frequent.
        const logits = Float32Array.from({ length: rowsCount * c.vocab }, (_, i) => ((i * 7919 + c.seed) >>> 0) % 3);
        const context = c.context.map((t) => t % c.vocab);
        const params: SamplingParams = { temperature: c.sampled ? 0.8 : 0, topK: 0, topP: 0.9, minP: 0, repetitionPenalty: c.repetition };
        const step = requestRows(params, c.seed, context, tree);
        const [got] = samplerFor(simd, c.vocab).step(logits, step.rows, [step.tree]);
        const want = verify(tree, logits, c.vocab, {
          params,
          context,
          uniforms: c.sampled ? (depth) => uniformAt(c.seed, context.length + depth) : undefined,
        });
        expect(got.accepted.map((r) => r - 1)).toEqual(want.accepted);
        expect(got.bonus).toBe(want.bonusToken);
      }),
      { numRuns: 300 },
    );
  });
});

describe("bad input is refused by name and the backend keeps working", () => {
  const vocab = 8;
  const ok: SamplingParams = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 };
  const one = (params: SamplingParams, extra: Partial<SampleRow> = {}) =>
    pickRows(simd, new Float32Array(vocab), vocab, [{ params, counts: null, seed: 0, position: 0, ...extra }]);

  test("parameters out of range name si_sample, the row and the field", () => {
    expect(() => one({ ...ok, topP: 0 })).toThrow(/si_sample: row 0: top_p must be in \(0, 1\]/);
    expect(() => one({ ...ok, topK: 1.5 })).toThrow(/si_sample: row 0: top_k must be an integer/);
    expect(() => one({ ...ok, temperature: Number.POSITIVE_INFINITY })).toThrow(BackendError);
    expect(() => one(ok, { seed: 2 ** 60 })).toThrow(/seed must be an integer below 2\^53/);
    expect(() => one({ ...ok, repetitionPenalty: 2 }, { counts: new Map([[99, 1]]) })).toThrow(/list token 99 at entry 0 is outside \[0, 8\)/);
    expect(one(ok)).toHaveLength(1);
  });

  test("a malformed tree names si_tree_accept and the row", () => {
    const s = samplerFor(simd, vocab);
    const rows: SampleRow[] = [0, 1].map(() => ({ params: ok, counts: null, seed: 0, position: 0 }));
    expect(() => s.step(new Float32Array(2 * vocab), rows, [{ parents: Int32Array.of(-1, 1), tokens: Int32Array.of(0, 3) }])).toThrow(
      /si_tree_accept: tree 0 row 1 has parent 1; parents must come before children/,
    );
    expect(() => s.step(new Float32Array(2 * vocab), rows, [{ parents: Int32Array.of(-1), tokens: Int32Array.of(0) }])).toThrow(
      /the trees cover 1 rows, the step has 2/,
    );
  });
});

describe("a forward's logits are sampled where they lie", () => {
  test("run() leaves the rows on the device: the sampler reads them there and picks what it picks from their host copy; host() is forward()'s logits", () => {
    const model = loadModel(join(import.meta.dir, "..", "..", "models", "llama-shakespeare-8m"), simd, { maxBatchTokens: 32 });
    const kv = createKVCache(model, { maxSeqs: 1, maxSeqLen: 64 });
    try {
      const row = kv.openSequence();
      kv.reserve(row, 12);
      const b = new BatchBuilder(model.maxWords);
      b.addChain(row, 0, [1, 269, 458, 13, 450, 338, 263, 1243, 322, 445, 183, 892], 0, "all");
      const batch = b.build();
      const vocab = model.config.vocabSize;
      const copy = Float32Array.from(model.forward(batch, kv));
      const logits = model.run(batch, kv);
      expect(logits.rows).toBe(12);
      expect(Array.from(logits.host())).toEqual(Array.from(copy));
      expect(simd.addressOf(logits.host())).toBe(logits.ptr); // the CPU's device memory is the host's
      const params: SamplingParams = { temperature: 0.8, topK: 40, topP: 0.95, minP: 0, repetitionPenalty: 1.1 };
      const step = requestRows(params, 5, [1, 2869], null);
      const rows = Array.from({ length: 12 }, (_, r) => ({ ...step.rows[0], position: 2 + r }));
      const trees = rows.map(() => ({ parents: Int32Array.of(-1), tokens: Int32Array.of(0) }));
      const sampler = samplerFor(simd, vocab);
      const onDevice = sampler.step(logits, rows, trees).map((o) => o.bonus);
      const fromHost = sampler.step(copy, rows, trees).map((o) => o.bonus);
      expect(onDevice).toEqual(fromHost);
      expect(() => sampler.step({ ...logits, rows: 11 }, rows, trees)).toThrow(/12 rows of 4096 logits needed, got 11/);
    } finally {
      kv.close();
      model.close();
    }
  });
});

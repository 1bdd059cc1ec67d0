// The engine's step loop with and without speculation: the DESIGN.md invariants
// (greedy output identical to incremental, sampled output distributed as incremental,
// batch invariance, KV pools back to full) on seeded random tiny models.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { createEngine, type Engine } from "../../src/engine/core";
import { BatchBuilder } from "../../src/model/batch";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";
import { processLogits } from "../../src/speculation/sampling";
import { createSpeculator, type SpeculationOptions } from "../../src/speculation/speculator";
import { writeTinyModel, type TinyDims, type TinyDType } from "../helpers/tiny-model";
import { chiSquareFit } from "../speculation/toy";
import { createKVCache } from "../../src/kv/cache";

const backend = CpuBackend.create({ threads: 2 });
const dir = mkdtempSync(join(tmpdir(), "specinfer-engine-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const VOCAB = 64;
const LLM_DIMS: TinyDims = { vocab: VOCAB, hidden: 64, intermediate: 128, layers: 2, heads: 4, kvHeads: 2 };
const SMALL_DIMS: TinyDims = { vocab: VOCAB, hidden: 32, intermediate: 64, layers: 1, heads: 2, kvHeads: 1 };
let count = 0;

function model(seed: number, dims: TinyDims, dtype: TinyDType = "F32"): CausalLM {
  const written = writeTinyModel(join(dir, `m${count++}`), { seed, dims, dtype, format: "gguf", maxPositionEmbeddings: 192 });
  return loadModel(written.path, backend, { maxBatchTokens: 512 });
}

const llm = model(1, LLM_DIMS);
// Drafters near and far from the LLM: its own weights quantized (agrees often), an
// unrelated model, and a smaller unrelated one.
const near = model(1, LLM_DIMS, "Q8_0");
const far = model(2, LLM_DIMS);
const small = model(3, SMALL_DIMS);

function prompts(n: number, seed: number): number[][] {
  return Array.from({ length: n }, (_, i) => Array.from({ length: 3 + ((seed + i * 5) % 13) }, (_, t) => 1 + ((seed * 31 + i * 17 + t * 7) % (VOCAB - 1))));
}

function run(engine: Engine, ps: number[][], config: Parameters<Engine["submit"]>[1]): number[][] {
  const reqs = ps.map((p, i) => engine.submit(p, { ...config, seed: (config?.seed ?? 0) + i }));
  engine.runUntilDone();
  return reqs.map((r) => r.generated);
}

function speculative(opts: SpeculationOptions, maxSeqs = 8): Engine {
  return createEngine(llm, { maxRequestsPerBatch: maxSeqs, speculator: createSpeculator(llm, maxSeqs, opts) });
}

function expectPoolsFull(engine: Engine): void {
  expect(engine.kv.freeBlocks).toBe(engine.kv.totalBlocks);
  expect(engine.speculator?.draftBlocksInUse() ?? 0).toBe(0);
}

describe("greedy speculative output equals greedy incremental output", () => {
  const configs: { name: string; opts: SpeculationOptions }[] = [
    { name: "near SSM, static 1,1,3,1,1", opts: { ssms: [near], tree: "1,1,3,1,1", ngram: false } },
    { name: "far SSM, static 2,2,1", opts: { ssms: [far], tree: "2,2,1", ngram: false } },
    { name: "near SSM, dynamic:16", opts: { ssms: [near], tree: "dynamic:16", ngram: false } },
    { name: "3 SSMs, static 1,2,1,1", opts: { ssms: [near, far, small], tree: "1,2,1,1", ngram: false } },
    { name: "2 SSMs + n-gram, dynamic:24:6:3", opts: { ssms: [near, small], tree: "dynamic:24:6:3", ngram: true } },
    { name: "n-gram only", opts: { ssms: [], ngram: true } },
    { name: "near SSM, 84-node tree 4,4,2,1", opts: { ssms: [near], tree: "4,4,2,1", ngram: true } },
  ];
  const incremental = createEngine(llm, { maxRequestsPerBatch: 8 });
  for (const batch of [1, 3, 8]) {
    const ps = prompts(batch, batch);
    const want = run(incremental, ps, { maxNewTokens: 40, ignoreEos: true });
    for (const c of configs) {
      test(`${c.name}, ${batch} sequence(s) per batch`, () => {
        const engine = speculative(c.opts);
        const got = run(engine, ps, { maxNewTokens: 40, ignoreEos: true });
        expect(got).toEqual(want);
        expectPoolsFull(engine);
        engine.close();
      });
    }
  }
  test("more requests than rows: queued requests run later and give the same tokens", () => {
    const ps = prompts(11, 4);
    const want = run(incremental, ps, { maxNewTokens: 25, ignoreEos: true });
    const engine = speculative({ ssms: [near], tree: "1,1,3,1", ngram: true }, 4);
    expect(run(engine, ps, { maxNewTokens: 25, ignoreEos: true })).toEqual(want);
    expectPoolsFull(engine);
    engine.close();
  });
});

describe("batch invariance", () => {
  test("a sampled request's tokens do not depend on what else is in the batch", () => {
    const config = { maxNewTokens: 30, temperature: 0.9, topK: 20, seed: 77, ignoreEos: true };
    for (const make of [() => createEngine(llm, { maxRequestsPerBatch: 8 }), () => speculative({ ssms: [near], tree: "2,1,1", ngram: false })]) {
      const alone = make();
      const a = alone.submit(prompts(1, 9)[0], config);
      alone.runUntilDone();
      alone.close();
      const crowded = make();
      const others = prompts(5, 2).map((p, i) => crowded.submit(p, { ...config, seed: 100 + i }));
      const b = crowded.submit(prompts(1, 9)[0], config);
      crowded.runUntilDone();
      expect(b.generated).toEqual(a.generated);
      expect(others.every((r) => r.generated.length === 30)).toBe(true);
      expectPoolsFull(crowded);
      crowded.close();
    }
  });
});

describe("stopping", () => {
  test("maxNewTokens, stop token ids and cancellation cut multi-token steps exactly and free every block", () => {
    const engine = speculative({ ssms: [llm], tree: "1,1,1,1,1,1", ngram: false });
    const p = prompts(1, 3)[0];
    const full = engine.submit(p, { maxNewTokens: 13, ignoreEos: true });
    engine.runUntilDone();
    expect(full.generated.length).toBe(13);
    expect(full.finishReason).toBe("length");
    // The LLM drafting for itself accepts whole trees: steps emit several tokens.
    expect(full.stats.summary(13).meanAcceptedLength).toBeGreaterThan(3);
    const stopAt = full.generated[7];
    const firstStop = full.generated.indexOf(stopAt);
    const stopped = engine.submit(p, { maxNewTokens: 13, stopTokenIds: [stopAt], ignoreEos: true });
    engine.runUntilDone();
    expect(stopped.generated).toEqual(full.generated.slice(0, firstStop));
    expect(stopped.finishReason).toBe("stop");
    const cancelled = engine.submit(p, { maxNewTokens: 100, ignoreEos: true });
    engine.step();
    engine.step();
    engine.cancel(cancelled.id);
    expect(cancelled.finishReason).toBe("cancelled");
    expect(engine.idle).toBe(true);
    expectPoolsFull(engine);
    engine.close();
  });

  test("generation stops at the context length; over-long prompts and bad ids are refused", () => {
    const engine = createEngine(llm, { maxRequestsPerBatch: 2 });
    const ctx = llm.config.maxPositionEmbeddings;
    const r = engine.submit(prompts(1, 1)[0].concat(Array(ctx - 20).fill(5)), { maxNewTokens: 1000, ignoreEos: true });
    engine.runUntilDone();
    expect(r.finishReason).toBe("length");
    expect(r.prompt.length + r.generated.length).toBe(ctx);
    expect(() => engine.submit(Array(ctx).fill(3))).toThrow(/context of 192/);
    expect(() => engine.submit([1, VOCAB])).toThrow(/outside the vocabulary/);
    expect(() => engine.submit([])).toThrow(/empty/);
    expect(() => engine.submit([1], { temperature: -1 })).toThrow(/temperature/);
    expectPoolsFull(engine);
    engine.close();
  });
});

describe("stochastic speculative sampling", () => {
  const N = 20000;
  const params = { temperature: 1, topK: 12, topP: 0.95 };
  const prompt = [1, 7, 3];
  const tiny = model(11, { ...LLM_DIMS, vocab: 16 });
  const tinyDraft = model(11, { ...LLM_DIMS, vocab: 16 }, "Q4_0");
  const tinyFar = model(12, { ...SMALL_DIMS, vocab: 16 });

  /** Exact P(first two tokens) of the LLM under `params`. */
  function exactPairs(): Float64Array {
    const forward = (tokens: number[]) => {
      const kv = createKVCache(tiny, { maxSeqs: 1, maxSeqLen: 8 });
      const row = kv.openSequence();
      kv.reserve(row, tokens.length);
      const b = new BatchBuilder(1);
      b.addChain(row, 0, tokens, 0, "last");
      const p = processLogits(tiny.forward(b.build(), kv).slice(), { ...params, minP: 0, repetitionPenalty: 1 });
      kv.close();
      return p;
    };
    const p1 = forward(prompt);
    const pairs = new Float64Array(256);
    for (let a = 0; a < 16; a++) {
      if (p1[a] === 0) continue;
      const p2 = forward([...prompt, a]);
      for (let b = 0; b < 16; b++) pairs[a * 16 + b] = p1[a] * p2[b];
    }
    return pairs;
  }

  function samplePairs(engine: Engine): Float64Array {
    const counts = new Float64Array(256);
    const reqs = Array.from({ length: N }, (_, i) => engine.submit(prompt, { ...params, maxNewTokens: 2, seed: i, ignoreEos: true }));
    engine.runUntilDone();
    for (const r of reqs) counts[r.generated[0] * 16 + r.generated[1]]++;
    return counts;
  }

  const exact = exactPairs();
  test("incremental sampling fits the exact two-token distribution (the test's own control)", () => {
    const engine = createEngine(tiny, { maxRequestsPerBatch: 32 });
    const fit = chiSquareFit(samplePairs(engine), exact);
    engine.close();
    expect(fit.pValue).toBeGreaterThan(1e-4);
  });
  test("speculative sampling with sampled SSM trees and n-gram fits it too", () => {
    const engine = createEngine(tiny, { maxRequestsPerBatch: 32, speculator: createSpeculator(tiny, 32, { ssms: [tinyDraft, tinyFar], tree: "2,2,1", ngram: true }) });
    const fit = chiSquareFit(samplePairs(engine), exact);
    expectPoolsFull(engine);
    engine.close();
    expect(fit.pValue).toBeGreaterThan(1e-4);
  });
});

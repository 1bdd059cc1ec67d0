// Serving properties of the engine core (issue: serving engine): KV blocks taken on
// demand with preemption, batch invariance of 32 mixed requests with and without
// speculation, per-request speculation in one forward, both KV dtypes, pools full
// after every test. Seeded random tiny models; the core runs in-thread here.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType } from "../../src/backend/backend";
import { CpuBackend } from "../../src/backend/cpu";
import { createEngine, type CreateEngineOptions, type Engine } from "../../src/engine/core";
import type { GenerationConfig } from "../../src/engine/config";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";
import { measureCosts, summedCurve } from "../../src/runtime/measure";
import { createSpeculator } from "../../src/speculation/speculator";
import { writeTinyModel, type TinyDims, type TinyDType } from "../helpers/tiny-model";

const backend = CpuBackend.create({ threads: 2 });
const dir = mkdtempSync(join(tmpdir(), "specinfer-serving-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const VOCAB = 64;
const DIMS: TinyDims = { vocab: VOCAB, hidden: 64, intermediate: 128, layers: 2, heads: 4, kvHeads: 2 };
let count = 0;
function model(seed: number, dtype: TinyDType = "F32"): CausalLM {
  const written = writeTinyModel(join(dir, `m${count++}`), { seed, dims: DIMS, dtype, format: "gguf", maxPositionEmbeddings: 192 });
  return loadModel(written.path, backend, { maxBatchTokens: 256 });
}
const llm = model(1);
const draft = model(1, "Q8_0"); // the LLM's own weights quantized: agrees often

interface Job {
  prompt: number[];
  config: Partial<GenerationConfig>;
}

/** 32 requests of mixed prompt and output lengths; every third one sampled with a seed. */
function jobs(n = 32): Job[] {
  return Array.from({ length: n }, (_, i) => ({
    prompt: Array.from({ length: 3 + ((i * 7) % 37) }, (_, t) => 1 + ((i * 13 + t * 5) % (VOCAB - 1))),
    config: { maxNewTokens: 8 + ((i * 11) % 33), ignoreEos: true, ...(i % 3 === 0 ? { temperature: 0.9, topK: 16, seed: 1000 + i } : {}) },
  }));
}

/** Measured once: what "auto" sizes trees by. */
const cost = measureCosts(llm, (grid) => summedCurve([draft], grid), 256, 32);

function engine(o: CreateEngineOptions & { speculate?: boolean }): Engine {
  const maxRequests = o.maxRequestsPerBatch ?? 8;
  const speculator = o.speculate ? createSpeculator(llm, maxRequests, { ssms: [draft], tree: "1,2,1", ngram: true }) : null;
  return createEngine(llm, { ...o, speculator, cost: speculator ? cost : null });
}

function runAll(e: Engine, js: Job[], speculation: GenerationConfig["speculation"]): number[][] {
  const reqs = js.map((j) => e.submit(j.prompt, { ...j.config, speculation }));
  e.runUntilDone();
  return reqs.map((r) => r.generated);
}

function expectPoolsFull(e: Engine): void {
  expect(e.kv.freeBlocks).toBe(e.kv.totalBlocks);
  expect(e.speculator?.draftBlocksInUse() ?? 0).toBe(0);
}

/** Blocks all of `js` would hold at once at their max tokens (prompt + output + a tree). */
function fullDemand(e: Engine, js: Job[]): number {
  return js.reduce((n, j) => n + Math.ceil((j.prompt.length + j.config.maxNewTokens! + 8) / e.kv.blockSize), 0);
}

/** Each job run alone, one after another, with the same speculation setting. */
function alone(speculate: boolean, speculation: GenerationConfig["speculation"]): number[][] {
  const e = engine({ maxRequestsPerBatch: 1, speculate });
  const out = jobs().map((j) => runAll(e, [j], speculation)[0]);
  expectPoolsFull(e);
  e.close();
  return out;
}
const plainAlone = alone(false, false);

describe("batch invariance: 32 concurrent mixed requests produce what each produces alone", () => {
  for (const [name, speculate, speculation] of [
    ["no speculation", false, false],
    ["a fixed tree with SSM and n-gram", true, { tree: "1,2,1", ngram: true }],
    ["auto (trees sized per step; sampled requests verified with per-position draws)", true, "auto"],
  ] as const) {
    test(name, () => {
      const want = speculate ? alone(true, speculation) : plainAlone;
      const e = engine({ maxRequestsPerBatch: 32, speculate });
      const got = runAll(e, jobs(), speculation);
      expect(got).toEqual(want);
      // Greedy requests (two in three) give the incremental tokens whatever the setting;
      // under auto, sampled ones do too (one fixed draw per position).
      jobs().forEach((j, i) => (j.config.temperature === undefined || speculation === "auto") && expect(got[i]).toEqual(plainAlone[i]));
      expectPoolsFull(e);
      e.close();
    });
  }
});

describe("KV blocks on demand", () => {
  test("a pool 4x too small for every request at max tokens finishes all of them, by preemption, with unchanged output", () => {
    for (const speculate of [false, true]) {
      const probe = engine({ maxRequestsPerBatch: 32 });
      const blocks = Math.floor(fullDemand(probe, jobs()) / 4);
      probe.close();
      const speculation = speculate ? { tree: "1,2,1", ngram: true } : false;
      const e = engine({ maxRequestsPerBatch: 32, kvBlocks: blocks, speculate });
      expect(runAll(e, jobs(), speculation)).toEqual(speculate ? alone(true, speculation) : plainAlone);
      expect(e.stats().preemptions).toBeGreaterThan(0);
      expectPoolsFull(e);
      e.close();
    }
  });

  test("admission needs blocks for the prompt and one tree, not for max tokens", () => {
    const e = engine({ maxRequestsPerBatch: 8, kvBlocks: 8 });
    // Each asks for 150 tokens (10 blocks at max), more than the whole pool; 4-token
    // prompts need 1 block to start, so all four run at once. A request left alone that
    // still cannot grow ends with "length": the pool is its context.
    const reqs = Array.from({ length: 4 }, (_, i) => e.submit([1, 2, 3, 4 + i], { maxNewTokens: 150, ignoreEos: true }));
    e.step();
    expect(e.stats().running).toBe(4);
    e.runUntilDone();
    for (const r of reqs) {
      expect(r.finishReason).toBe("length");
      expect(r.prompt.length + r.generated.length).toBeGreaterThan(8 * 16 - 16);
    }
    expect(e.stats().preemptions).toBeGreaterThan(0);
    expectPoolsFull(e);
    e.close();
  });

  test("a request that can never fit is refused at submit; the others go on", () => {
    const e = engine({ maxRequestsPerBatch: 4, kvBlocks: 4 });
    const ok = e.submit([1, 2, 3], { maxNewTokens: 10, ignoreEos: true });
    expect(() => e.submit(Array(70).fill(5), { maxNewTokens: 1 })).toThrow(/needs 5 KV blocks; the whole cache has 4/);
    e.runUntilDone();
    expect(ok.generated.length).toBe(10);
    expectPoolsFull(e);
    e.close();
  });

  test("cancelling a running request frees its blocks at once", () => {
    const e = engine({ maxRequestsPerBatch: 4, speculate: true });
    const r = e.submit([1, 2, 3, 4, 5], { maxNewTokens: 100, ignoreEos: true, speculation: { tree: "2,2" } });
    e.step();
    e.step();
    expect(e.kv.freeBlocks).toBeLessThan(e.kv.totalBlocks);
    const events = e.cancel(r.id);
    expect(events).toEqual([expect.objectContaining({ type: "finish", id: r.id, reason: "cancelled" })]);
    expectPoolsFull(e);
    e.close();
  });
});

describe("KV cache dtypes", () => {
  for (const dtype of [DType.F32, DType.F16] as const) {
    test(`greedy speculative output equals incremental output with an ${dtype === DType.F32 ? "f32" : "f16"} cache`, () => {
      const greedy = jobs(8).map((j) => ({ ...j, config: { maxNewTokens: 30, ignoreEos: true } }));
      const plain = engine({ maxRequestsPerBatch: 8, kvDtype: dtype });
      const want = runAll(plain, greedy, false);
      plain.close();
      const spec = engine({ maxRequestsPerBatch: 8, kvDtype: dtype, speculate: true });
      expect(runAll(spec, greedy, { tree: "2,2,1", ngram: true })).toEqual(want);
      expectPoolsFull(spec);
      spec.close();
    });
  }
});

describe("failures", () => {
  test("a step that throws fails only the requests in it, with the error's message", () => {
    const e = engine({ maxRequestsPerBatch: 1 });
    const a = e.submit([1, 2, 3], { maxNewTokens: 20, ignoreEos: true });
    const b = e.submit([4, 5, 6], { maxNewTokens: 20, ignoreEos: true });
    e.step();
    e.injectFault("boom in the forward");
    const events = e.step();
    expect(events).toContainEqual(expect.objectContaining({ type: "finish", id: a.id, reason: "error", error: "boom in the forward" }));
    e.runUntilDone();
    expect(b.generated.length).toBe(20);
    expectPoolsFull(e);
    e.close();
  });
});

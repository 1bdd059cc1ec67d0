// The SSMs on a device of their own (`ssmDevice`): they draft in a Worker while the
// engine's LLM verifies the other micro-batch. Output must not change: greedy requests
// give the incremental tokens, seeded sampled ones the tokens they give with the SSMs
// on the engine's thread (each request's rng is drawn in the same order); the
// micro-batches stay even; preemption, cancellation and errors leave nothing behind.

import { afterAll, describe, expect, test } from "bun:test";
import { CpuBackend } from "../../src/backend/cpu";
import type { GenerationConfig } from "../../src/engine/config";
import { createEngine, type Engine } from "../../src/engine/core";
import { CostCurve, CostModel } from "../../src/engine/cost";
import { loadModel } from "../../src/model/registry";
import { createSpeculator, draftGrowth } from "../../src/speculation/speculator";
import { Runtime, type RuntimeOptions } from "../../src/runtime/load";
import { DEFAULT_DRAFT, DEFAULT_MODEL } from "../../src/runtime/paths";
import { RemoteDrafters } from "../../src/runtime/remote-drafters";

interface Job {
  prompt: number[];
  config: Partial<GenerationConfig>;
}

/** Mixed requests: greedy and seeded sampled, fixed trees, auto, prompt lookup, none. */
function jobs(n: number): Job[] {
  const speculations: GenerationConfig["speculation"][] = [{ tree: "1,1,3,1" }, "auto", { tree: "2,1,1", ngram: true }, false, { tree: "1,1,1,1,1" }];
  return Array.from({ length: n }, (_, i) => ({
    prompt: Array.from({ length: 4 + ((i * 7) % 23) }, (_, t) => 40 + ((i * 13 + t * 5) % 3000)),
    config: {
      maxNewTokens: 12 + ((i * 11) % 29),
      ignoreEos: true,
      speculation: speculations[i % speculations.length],
      ...(i % 3 === 1 ? { temperature: 0.8, topK: 40, seed: 500 + i } : { temperature: 0 }),
    },
  }));
}

const runtimes: Runtime[] = [];
/** Without measured costs the engine overlaps whenever two requests speculate (with
 *  them it overlaps where the cost model says it pays: test/engine/cost.test.ts). */
async function load(o: RuntimeOptions): Promise<Runtime> {
  const r = await Runtime.load({ threads: 1, measure: false, maxRequestsPerBatch: 8, ...o });
  runtimes.push(r);
  return r;
}
afterAll(() => {
  for (const r of runtimes) r.close();
});

/** Runs the jobs, recording every step's verified decode entries; checks the pools drained. */
function run(engine: Engine, js: Job[]): { tokens: number[][]; drafted: number; maxDecodes: number } {
  const reqs = js.map((j) => engine.submit(j.prompt, j.config));
  let maxDecodes = 0;
  while (!engine.idle) {
    engine.step();
    maxDecodes = Math.max(maxDecodes, engine.stats().lastStep.treeNodes.filter((n) => n > 0).length);
  }
  expect(engine.kv.freeBlocks).toBe(engine.kv.totalBlocks);
  expect(engine.speculator?.draftBlocksInUse() ?? 0).toBe(0);
  for (const r of reqs) expect(r.error ?? null).toBeNull();
  return { tokens: reqs.map((r) => r.generated), drafted: reqs.reduce((n, r) => n + r.fromDraft.filter(Boolean).length, 0), maxDecodes };
}

describe("SSMs drafting on a device of their own", () => {
  test("greedy output equals incremental output and sampled output equals the in-thread engine's, for mixed requests", async () => {
    const js = jobs(10);
    const inThread = await load({});
    const plain = run(inThread.engine, js.map((j) => ({ ...j, config: { ...j.config, speculation: false } })));
    const here = run(inThread.engine, js);
    const pipelined = await load({ ssmDevice: 1 });
    expect(pipelined.engine.speculator?.concurrent).toBe(true);
    const overlapped = run(pipelined.engine, js);
    expect(pipelined.engine.stats().overlappedSteps).toBeGreaterThan(10);
    js.forEach((j, i) => {
      if (j.config.temperature === 0) expect(overlapped.tokens[i]).toEqual(plain.tokens[i]);
      expect(overlapped.tokens[i]).toEqual(here.tokens[i]);
    });
    expect(overlapped.drafted).toBeGreaterThan(40); // the drafts were used, not just the bonus tokens
  });

  test("the micro-batches alternate: a step verifies at most half the speculating requests", async () => {
    const runtime = runtimes.find((r) => r.engine.speculator?.concurrent) ?? (await load({ ssmDevice: 1 }));
    const js = Array.from({ length: 6 }, (_, i) => ({ prompt: [1, 100 + i, 200 + i], config: { maxNewTokens: 30, ignoreEos: true, temperature: 0, speculation: { tree: "1,1,1" } } }));
    const got = run(runtime.engine, js);
    expect(got.maxDecodes).toBe(3);
    expect(got.drafted).toBeGreaterThan(30);
  });

  test("preemption in a small KV pool and cancellation mid-draft lose no tokens and leak no blocks", async () => {
    const small = await load({ ssmDevice: 1, kvMemory: 600_000, maxRequestsPerBatch: 6 });
    const big = runtimes[0];
    const js = Array.from({ length: 6 }, (_, i) => ({ prompt: Array.from({ length: 30 }, (_, t) => 50 + ((i * 31 + t * 7) % 2000)), config: { maxNewTokens: 60, ignoreEos: true, temperature: 0, speculation: { tree: "1,1,3,1" } } }));
    const want = run(big.engine, js.map((j) => ({ ...j, config: { ...j.config, speculation: false } })));
    const engine = small.engine;
    const reqs = js.map((j) => engine.submit(j.prompt, j.config));
    let steps = 0;
    while (!engine.idle) {
      engine.step();
      if (++steps === 12) engine.cancel(reqs[2].id);
    }
    expect(engine.stats().preemptions).toBeGreaterThan(0);
    reqs.forEach((r, i) => {
      if (i === 2) expect(r.finishReason).toBe("cancelled");
      else expect(r.generated).toEqual(want.tokens[i]);
    });
    expect(engine.kv.freeBlocks).toBe(engine.kv.totalBlocks);
    expect(engine.speculator?.draftBlocksInUse()).toBe(0);
  });

  test("a draft model that cannot load is refused by name and the runtime is not left half made", async () => {
    await expect(Runtime.load({ ssms: ["/no/such/draft.gguf"], ssmDevice: 1, measure: false })).rejects.toThrow("no such file or directory: /no/such/draft.gguf");
    const runtime = await load({ ssmDevice: 1, measure: false });
    const tokenizerPath = runtime.modelPath + "/tokenizer.json";
    expect(() => runtime.compile({ ssms: [tokenizerPath] })).toThrow("draft worker:");
    // Still serving with the drafters in force before.
    const r = runtime.engine.submit([1, 300, 301], { maxNewTokens: 8, ignoreEos: true, temperature: 0, speculation: { tree: "1,1" } });
    runtime.engine.runUntilDone(r);
    expect(r.generated.length).toBe(8);
  });

  test("a posted message that fails in the worker is reported by the next call, and the worker keeps serving", () => {
    const drafters = new RemoteDrafters({ ssms: [DEFAULT_DRAFT], kind: "cpu", device: 0, threads: 1, maxSeqs: 2, maxSeqLen: 256, maxGrowth: 64, vocab: 4096 });
    try {
      drafters.accept(99, [5]);
      expect(() => drafters.blocksInUse()).toThrow("draft worker: SSM drafter: request 99 is not open");
      expect(drafters.blocksInUse()).toBe(0);
    } finally {
      drafters.closeAll();
    }
    expect(() => new RemoteDrafters({ ssms: [DEFAULT_DRAFT], kind: "cpu", device: 0, threads: 1, maxSeqs: 2, maxSeqLen: 256, maxGrowth: 64, vocab: 32000 })).toThrow(
      "draft worker: draft model vocabulary (4096) differs from the LLM's (32000)",
    );
  });

  test("steps that switch between overlapping and drafting in-step keep greedy output equal to incremental output", () => {
    const backend = CpuBackend.create({ threads: 1 });
    const llm = loadModel(DEFAULT_MODEL, backend, { maxBatchTokens: 256 });
    // A cost model whose verdict on overlapping flips every third step.
    class Flipping extends CostModel {
      calls = 0;
      override overlapPays(): boolean {
        return Math.floor(this.calls++ / 3) % 2 === 0;
      }
    }
    const flat = new CostCurve([{ tokens: 1, ms: 1 }, { tokens: 64, ms: 2 }]);
    const cost = new Flipping(flat, flat, 6);
    const drafters = new RemoteDrafters({ ssms: [DEFAULT_DRAFT], kind: "cpu", device: 0, threads: 1, maxSeqs: 6, maxSeqLen: 512, maxGrowth: draftGrowth("1,1,3,1"), vocab: llm.config.vocabSize });
    const speculator = createSpeculator(llm, 6, { ssms: [], drafters, tree: "1,1,3,1", ngram: false }, 256);
    const engine = createEngine(llm, { maxRequestsPerBatch: 6, maxSeqLength: 256, speculator, cost });
    try {
      const js = jobs(6).map((j) => ({ ...j, config: { ...j.config, temperature: 0, speculation: { tree: "1,1,3,1" } } }));
      const got = run(engine, js);
      const want = run(runtimes[0].engine, js.map((j) => ({ ...j, config: { ...j.config, speculation: false } })));
      expect(got.tokens).toEqual(want.tokens);
      expect(cost.calls).toBeGreaterThan(12);
      expect(engine.stats().overlappedSteps).toBeGreaterThan(3);
      expect(got.drafted).toBeGreaterThan(30);
    } finally {
      engine.close();
      llm.close();
      backend.close();
    }
  });
});

// The forward pass on the CUDA backend against the CPU backend, on the trained pair:
// the same greedy tokens, incremental and speculative. Needs a GPU: run with
// SPECINFER_GPU=1 (the suite elsewhere is CPU-only and reports these as skipped).

import { expect, test } from "bun:test";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { createEngine } from "../../src/engine/core";
import { loadModel } from "../../src/model/registry";
import type { Backend } from "../../src/backend/backend";
import { createSpeculator } from "../../src/speculation/speculator";
import { GPU } from "../helpers/gpu.ts";

const models = join(import.meta.dir, "..", "..", "models");
const prompt = [1, 2869, 4058, 13, 4076, 4049, 2266, 1984, 4080, 13];

function greedy(backend: Backend, speculate: boolean): { tokens: number[]; ms: number } {
  const llm = loadModel(join(models, "llama-shakespeare-8m"), backend);
  const ssm = loadModel(join(models, "llama-shakespeare-1.4m-draft"), backend);
  const engine = createEngine(llm, { maxRequestsPerBatch: 4, speculator: speculate ? createSpeculator(llm, 4, { ssms: [ssm], tree: "2,2,1,1", ngram: false }) : null });
  const t = performance.now();
  const r = engine.submit(prompt, { maxNewTokens: 64, ignoreEos: true, temperature: 0 });
  engine.runUntilDone();
  const ms = performance.now() - t;
  expect(engine.kv.freeBlocks).toBe(engine.kv.totalBlocks);
  engine.close();
  ssm.close();
  llm.close();
  return { tokens: r.generated, ms };
}

test.skipIf(!GPU)("CUDA greedy tokens equal the CPU's, incremental and speculative (needs SPECINFER_GPU=1 and a GPU)", async () => {
  const { CudaBackend } = await import("../../src/backend/cuda");
  const cpu = CpuBackend.create({ threads: 2 });
  const gpu = CudaBackend.create();
  const want = greedy(cpu, false);
  const plain = greedy(gpu, false);
  const spec = greedy(gpu, true);
  console.log(JSON.stringify({ cpuMs: want.ms, cudaMs: plain.ms, cudaSpecMs: spec.ms, agree: plain.tokens.filter((t, i) => t === want.tokens[i]).length }));
  expect(plain.tokens).toEqual(want.tokens);
  expect(spec.tokens).toEqual(plain.tokens);
  gpu.close();
  cpu.close();
});

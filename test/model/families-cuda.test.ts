// Every new family's forward on the CUDA backend against the CPU backend, on tiny random
// models: the same logits (within f32 reordering) and, with a draft of the same family,
// speculative greedy tokens equal to incremental ones. Needs a GPU: run with
// SPECINFER_GPU=1 (elsewhere these are reported as skipped).

import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Backend, DType } from "../../src/backend/backend";
import { CpuBackend } from "../../src/backend/cpu";
import { createEngine } from "../../src/engine/core";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";
import { createSpeculator } from "../../src/speculation/speculator";
import { chainLogits, maxRelError } from "../helpers/forward";
import { writeTinyModel, type TinyModelOptions } from "../helpers/tiny-model";
import { GPU } from "../helpers/gpu.ts";

const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "specinfer-families-cuda-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const FAMILIES: [string, Omit<TinyModelOptions, "seed" | "dtype">][] = [
  ["starcoder", { family: "starcoder", format: "gguf", dims: { vocab: 96, hidden: 64, intermediate: 96, layers: 2, heads: 4, kvHeads: 1 } }],
  ["opt", { family: "opt", format: "safetensors", dims: { vocab: 96, hidden: 64, intermediate: 128, layers: 2, heads: 4, kvHeads: 4 }, wordEmbedProjDim: 32 }],
  ["falcon", { family: "falcon", format: "gguf", dims: { vocab: 96, hidden: 64, intermediate: 96, layers: 2, heads: 8, kvHeads: 2 }, twoNorms: true }],
  ["mpt", { family: "mpt", format: "gguf", dims: { vocab: 96, hidden: 96, intermediate: 192, layers: 2, heads: 6, kvHeads: 6 } }],
];

function greedy(llm: CausalLM, draft: CausalLM | null): number[] {
  const engine = createEngine(llm, { maxRequestsPerBatch: 2, speculator: draft ? createSpeculator(llm, 2, { ssms: [draft], tree: "2,1,1", ngram: false }) : null });
  const r = engine.submit(PROMPT, { maxNewTokens: 24, ignoreEos: true });
  engine.runUntilDone();
  engine.close();
  return r.generated;
}

for (const [name, opts] of FAMILIES) {
  test.skipIf(!GPU)(`${name}: CUDA logits equal the CPU's; CUDA speculative greedy == incremental (needs SPECINFER_GPU=1 and a GPU)`, async () => {
    const { CudaBackend } = await import("../../src/backend/cuda");
    const cpu = CpuBackend.create({ threads: 2 });
    const gpu = CudaBackend.create();
    const llmPath = writeTinyModel(join(dir, `${name}-llm`), { ...opts, seed: 3, dtype: "F16" }).path;
    const draftPath = writeTinyModel(join(dir, `${name}-draft`), { ...opts, seed: 4, dtype: "F32" }).path;
    const load = (be: Backend, p: string) => loadModel(p, be, { maxBatchTokens: 64 });
    const [c, g, d] = [load(cpu, llmPath), load(gpu, llmPath), load(gpu, draftPath)];
    const err = maxRelError(chainLogits(g, PROMPT, DType.F32), chainLogits(c, PROMPT, DType.F32).map((r) => Float64Array.from(r)));
    expect(err).toBeLessThan(1e-4);
    expect(greedy(g, d)).toEqual(greedy(g, null));
    for (const m of [c, g, d]) m.close();
    cpu.close();
    gpu.close();
  });
}

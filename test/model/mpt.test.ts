// MPT: the forward (ALiBi, LayerNorm without bias) against an independent float64 reference across
// formats and dtypes, config refusals, and greedy speculation == incremental decoding.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType } from "../../src/backend/backend";
import { CpuBackend } from "../../src/backend/cpu";
import { createEngine } from "../../src/engine/core";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";
import { createSpeculator } from "../../src/speculation/speculator";
import { chainLogits, maxRelError } from "../helpers/forward";
import { mptReferenceForward } from "../helpers/reference-mpt";
import { writeTinyModel, type TinyDims, type TinyModelOptions } from "../helpers/tiny-model";

const backend = CpuBackend.create({ threads: 2 });
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "specinfer-mpt-"));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

const DIMS: TinyDims = { vocab: 96, hidden: 64, intermediate: 96, layers: 2, heads: 4, kvHeads: 4 };
const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];
let counter = 0;

function tiny(opts: Partial<TinyModelOptions> & Pick<TinyModelOptions, "dtype" | "format">) {
  const written = writeTinyModel(join(dir, `m${counter++}`), { seed: 3, dims: DIMS, family: "mpt", ...opts });
  return { ...written, model: loadModel(written.path, backend, { maxBatchTokens: 128 }) };
}

describe("forward vs float64 reference", () => {
  for (const [dtype, format, tol] of [
    ["F32", "safetensors", 1e-4],
    ["F32", "gguf", 1e-4],
    ["F16", "safetensors", 1e-4],
    ["F16", "gguf", 1e-4],
    ["Q8_0", "gguf", 2e-2],
  ] as const) {
    test(`${dtype} ${format}: relative logit error <= ${tol}`, () => {
      const m = tiny({ dtype, format });
      expect(m.model.config.arch).toBe("mpt");
      const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), mptReferenceForward(m.config, m.weights, PROMPT));
      m.model.close();
      expect(err).toBeLessThanOrEqual(tol);
    });
  }

  test("six heads (not a power of two: slopes interleaved) and alibi_bias_max 4 match the reference", () => {
    const m = tiny({ dtype: "F32", format: "safetensors", dims: { ...DIMS, hidden: 96, heads: 6, kvHeads: 6 }, alibiMaxBias: 4 });
    const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), mptReferenceForward(m.config, m.weights, PROMPT));
    m.model.close();
    expect(err).toBeLessThanOrEqual(1e-4);
  });

  for (const format of ["safetensors", "gguf"] as const) {
    test(`clip_qkv 0.5 (clips most q/k/v values here), ${format}: matches the reference, and differs from the unclipped model`, () => {
      const m = tiny({ dtype: "F32", format, clipQkv: 0.5 });
      expect(m.model.config.clipQkv).toBe(0.5);
      const want = mptReferenceForward(m.config, m.weights, PROMPT);
      const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), want);
      m.model.close();
      expect(err).toBeLessThanOrEqual(1e-4);
      const unclipped = mptReferenceForward({ ...m.config, clipQkv: undefined }, m.weights, PROMPT);
      expect(maxRelError(unclipped, want)).toBeGreaterThan(1e-2);
    });
  }

  test("HF and GGUF forms of the same weights give the same logits", () => {
    const hf = tiny({ dtype: "F16", format: "safetensors" });
    const gguf = tiny({ dtype: "F16", format: "gguf" });
    const err = maxRelError(chainLogits(hf.model, PROMPT), chainLogits(gguf.model, PROMPT).map((r) => Float64Array.from(r)));
    hf.model.close();
    gguf.model.close();
    expect(err).toBeLessThan(1e-5);
  });
});

describe("unsupported configs are refused naming the field", () => {
  const rewrite = (edit: (j: Record<string, unknown>) => void) => {
    const m = writeTinyModel(join(dir, `c${counter++}`), { seed: 1, dims: DIMS, family: "mpt", dtype: "F32", format: "safetensors" });
    const j = JSON.parse(readFileSync(join(m.path, "config.json"), "utf8"));
    edit(j);
    writeFileSync(join(m.path, "config.json"), JSON.stringify(j));
    return () => loadModel(m.path, backend);
  };
  test("a clip_qkv that is not a positive number", () => {
    expect(rewrite((j) => ((j.attn_config as Record<string, unknown>).clip_qkv = -1))).toThrow(/attn_config.clip_qkv must be a positive number or null, got -1/);
  });
  test("alibi false", () => {
    expect(rewrite((j) => ((j.attn_config as Record<string, unknown>).alibi = false))).toThrow(/attn_config.alibi false .* is not supported/);
  });
  test("qk_ln", () => {
    expect(rewrite((j) => ((j.attn_config as Record<string, unknown>).qk_ln = true))).toThrow(/attn_config.qk_ln is not supported/);
  });
});

describe("speculation", () => {
  const generate = (llm: CausalLM, draft: CausalLM | null, prompts: number[][]) => {
    const engine = createEngine(llm, {
      maxRequestsPerBatch: prompts.length,
      speculator: draft ? createSpeculator(llm, prompts.length, { ssms: [draft], tree: "2,1,1", ngram: false }) : undefined,
    });
    const reqs = prompts.map((p) => engine.submit(p, { maxNewTokens: 24, ignoreEos: true }));
    engine.runUntilDone();
    const stats = engine.stats();
    engine.close();
    return { out: reqs.map((r) => r.generated), accepted: stats.numAcceptedTokens };
  };

  test("greedy speculative output with an MPT draft equals greedy incremental output", () => {
    const llm = tiny({ dtype: "F32", format: "safetensors" });
    // The same weights quantized: a draft that agrees often, so trees are accepted in part.
    const close = tiny({ dtype: "Q8_0", format: "gguf" });
    const far = writeTinyModel(join(dir, `d${counter++}`), { seed: 99, dims: { ...DIMS, layers: 1 }, family: "mpt", dtype: "F16", format: "gguf" });
    const farModel = loadModel(far.path, backend, { maxBatchTokens: 128 });
    const prompts = [PROMPT, [1, 3, 4], [7, 8, 9, 10, 11, 60, 61]];
    const plain = generate(llm.model, null, prompts);
    const withClose = generate(llm.model, close.model, prompts);
    const withFar = generate(llm.model, farModel, prompts);
    expect(withClose.out).toEqual(plain.out);
    expect(withFar.out).toEqual(plain.out);
    expect(withClose.accepted).toBeGreaterThan(0);
    for (const m of [llm.model, close.model, farModel]) m.close();
  });
});

// OPT: the forward against an independent float64 reference (LayerNorm before and
// after, project_in/out), dtypes, config refusals, and greedy speculation == incremental.

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
import { optReferenceForward } from "../helpers/reference-opt";
import { writeTinyModel, type TinyDims, type TinyModelOptions } from "../helpers/tiny-model";

const backend = CpuBackend.create({ threads: 2 });
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "specinfer-opt-"));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

const DIMS: TinyDims = { vocab: 96, hidden: 64, intermediate: 128, layers: 2, heads: 4, kvHeads: 4 };
const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];
let counter = 0;

function tiny(opts: Partial<TinyModelOptions> & Pick<TinyModelOptions, "dtype">) {
  const written = writeTinyModel(join(dir, `m${counter++}`), { seed: 5, dims: DIMS, family: "opt", format: "safetensors", ...opts });
  return { ...written, model: loadModel(written.path, backend, { maxBatchTokens: 128 }) };
}

describe("forward vs float64 reference", () => {
  for (const [dtype, tol] of [["F32", 1e-4], ["F16", 1e-4], ["BF16", 1e-4]] as const) {
    test(`${dtype} safetensors: relative logit error <= ${tol}`, () => {
      const m = tiny({ dtype });
      expect(m.model.config.arch).toBe("opt");
      const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), optReferenceForward(m.config, m.weights, PROMPT));
      m.model.close();
      expect(err).toBeLessThanOrEqual(tol);
    });
  }

  test("LayerNorm after each block (do_layer_norm_before false, OPT-350m style) matches the reference", () => {
    const m = tiny({ dtype: "F32", layerNormAfter: true });
    expect(m.weights.has("model.decoder.final_layer_norm.weight")).toBe(false);
    const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), optReferenceForward(m.config, m.weights, PROMPT));
    m.model.close();
    expect(err).toBeLessThanOrEqual(1e-4);
  });

  test("project_in/project_out (word_embed_proj_dim 32 != hidden 64) and an untied head match the reference", () => {
    const m = tiny({ dtype: "F32", wordEmbedProjDim: 32, tied: false });
    expect(m.weights.has("model.decoder.project_in.weight")).toBe(true);
    const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), optReferenceForward(m.config, m.weights, PROMPT));
    m.model.close();
    expect(err).toBeLessThanOrEqual(1e-4);
  });
});

describe("unsupported configs are refused naming the field", () => {
  const rewrite = (edit: (j: Record<string, unknown>) => void) => {
    const m = writeTinyModel(join(dir, `c${counter++}`), { seed: 1, dims: DIMS, family: "opt", dtype: "F32", format: "safetensors" });
    const j = JSON.parse(readFileSync(join(m.path, "config.json"), "utf8"));
    edit(j);
    writeFileSync(join(m.path, "config.json"), JSON.stringify(j));
    return () => loadModel(m.path, backend);
  };
  test("activation_function other than relu", () => {
    expect(rewrite((j) => (j.activation_function = "gelu"))).toThrow(/unsupported activation_function "gelu"/);
  });
  test("enable_bias false", () => {
    expect(rewrite((j) => (j.enable_bias = false))).toThrow(/enable_bias false is not supported/);
  });
  test("OPT has no GGUF form: the writer refuses it", () => {
    expect(() => writeTinyModel(join(dir, `g${counter++}`), { seed: 1, dims: DIMS, family: "opt", dtype: "F32", format: "gguf" })).toThrow(/llama.cpp has no opt architecture/);
  });
});

describe("speculation", () => {
  test("greedy speculative output with an OPT draft equals greedy incremental output", () => {
    const generate = (llm: CausalLM, draft: CausalLM | null, prompts: number[][]) => {
      const engine = createEngine(llm, {
        maxRequestsPerBatch: prompts.length,
        speculator: draft ? createSpeculator(llm, prompts.length, { ssms: [draft], tree: "2,1,1", ngram: false }) : undefined,
      });
      const reqs = prompts.map((p) => engine.submit(p, { maxNewTokens: 24, ignoreEos: true }));
      engine.runUntilDone();
      const accepted = engine.stats().numAcceptedTokens;
      engine.close();
      return { out: reqs.map((r) => r.generated), accepted };
    };
    const llm = tiny({ dtype: "F32" });
    const close = tiny({ dtype: "BF16" });
    const far = tiny({ dtype: "F16", seed: 77, dims: { ...DIMS, layers: 1 } });
    const prompts = [PROMPT, [1, 3, 4], [7, 8, 9, 10, 11, 60, 61]];
    const plain = generate(llm.model, null, prompts);
    const withClose = generate(llm.model, close.model, prompts);
    expect(withClose.out).toEqual(plain.out);
    expect(generate(llm.model, far.model, prompts).out).toEqual(plain.out);
    expect(withClose.accepted).toBeGreaterThan(0);
    for (const m of [llm.model, close.model, far.model]) m.close();
  });
});

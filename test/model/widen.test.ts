// Function-preserving widening: the widened model computes the original's logits, in
// the float64 reference and in the engine's own forward (GGUF and safetensors outputs).

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { loadLlama } from "../../src/model/llama";
import {
  encodeQ8_0, ggufModelMetadata, readFloatWeights, widenedConfig, widenModel, widenTensors, writeGGUF, type WidenSpec,
} from "../../src/model/widen";
import { referenceForward } from "../helpers/reference-llama";
import { dequantize, quantizeQ8_0, writeTinyModel, type TinyModelOptions } from "../helpers/tiny-model";
import { DType } from "../../src/backend/backend";
import { chainLogits, maxRelError } from "../helpers/forward";

const backend = CpuBackend.create({ threads: 2 });
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "specinfer-widen-"));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
  backend.close();
});

const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];
let counter = 0;

function tiny(opts: Partial<TinyModelOptions> = {}) {
  return writeTinyModel(join(dir, `src${counter++}`), {
    seed: 11,
    dtype: "F32",
    format: "safetensors",
    dims: { vocab: 96, hidden: 64, intermediate: 96, layers: 2, heads: 4, kvHeads: 2 },
    ...opts,
  });
}

function collect(path: string, spec: WidenSpec) {
  const src = readFloatWeights(path);
  const config = widenedConfig(src.config, spec);
  const weights = new Map<string, Float32Array>();
  for (const t of widenTensors(src, spec)) weights.set(t.name, t.values);
  src.close();
  return { config, weights };
}

describe("widening preserves the function (float64 reference)", () => {
  for (const [label, spec, opts] of [
    ["width 2, heads 2, ffn 2", { width: 2 }, {}],
    ["width 3, heads 2, ffn 3, 2 extra layers", { width: 3, heads: 2, ffn: 3, extraLayers: 2 }, {}],
    ["tied embeddings and q/k/v biases (Qwen2), width 2 + 1 layer", { width: 2, extraLayers: 1 }, { tied: true, attentionBias: true }],
  ] as const) {
    test(label, () => {
      const m = tiny(opts as Partial<TinyModelOptions>);
      const wide = collect(m.path, spec);
      expect(wide.config.hiddenSize).toBe(64 * spec.width);
      expect(wide.config.numLayers).toBe(2 + ((spec as WidenSpec).extraLayers ?? 0));
      const want = referenceForward(m.config, m.weights, PROMPT);
      const got = referenceForward(wide.config, wide.weights, PROMPT);
      // W/k is rounded to f32 when k is not a power of two: ~1e-7 relative.
      expect(maxRelError(got, want)).toBeLessThan(1e-6);
    });
  }

  test("an identity spec returns the same weights", () => {
    const m = tiny();
    const wide = collect(m.path, { width: 1 });
    for (const [name, v] of m.weights) expect(wide.weights.get(name)).toEqual(v);
  });
});

describe("widened files run in the engine with the original's logits", () => {
  const spec: WidenSpec = { width: 2, heads: 2, ffn: 2, extraLayers: 1 };

  test("GGUF F32 (q/k permuted for llama RoPE) and safetensors F32", () => {
    const m = tiny();
    const original = loadLlama(m.path, backend, { maxBatchTokens: 64 });
    const want = chainLogits(original, PROMPT);
    original.close();
    for (const dst of [join(dir, "wide.gguf"), join(dir, "wide-hf")]) {
      widenModel(m.path, dst, spec, { dtype: "F32" });
      const wide = loadLlama(dst, backend, { maxBatchTokens: 64 });
      expect(wide.config.hiddenSize).toBe(128);
      const got = chainLogits(wide, PROMPT);
      wide.close();
      expect(maxRelError(got, want)).toBeLessThan(1e-5);
    }
  });

  test("reading a widened GGUF back gives the HF-layout weights that were written", () => {
    const m = tiny();
    const dst = join(dir, "roundtrip.gguf");
    const cfg = widenModel(m.path, dst, spec, { dtype: "F32" });
    const wide = collect(m.path, spec);
    const back = readFloatWeights(dst);
    expect(back.config.hiddenSize).toBe(cfg.hiddenSize);
    for (const [name, v] of wide.weights) expect(back.get(name)).toEqual(v);
    back.close();
  });

  test("widened F16 GGUF stays within F16 rounding of the original", () => {
    const m = tiny();
    const original = loadLlama(m.path, backend, { maxBatchTokens: 64 });
    const want = chainLogits(original, PROMPT);
    original.close();
    const dst = join(dir, "wide-f16.gguf");
    widenModel(m.path, dst, spec, { dtype: "F16" });
    const wide = loadLlama(dst, backend, { maxBatchTokens: 64 });
    const got = chainLogits(wide, PROMPT);
    wide.close();
    expect(maxRelError(got, want)).toBeLessThan(1e-2);
  });
});

describe("writer", () => {
  test("Q8_0 encoder matches ggml's reference quantizer byte for byte", () => {
    const values = Float32Array.from({ length: 32 * 40 }, (_, i) => Math.sin(i * 12.9898) * (1 + (i % 7)) * (i % 97 === 0 ? 0 : 1));
    values.fill(0, 64, 96); // an all-zero block
    const ours = encodeQ8_0(values);
    expect(Array.from(ours)).toEqual(Array.from(quantizeQ8_0(values).data));
    expect(dequantize(DType.Q8_0, ours, values.length)).toEqual(quantizeQ8_0(values).stored);
  });

  test("tensors out of order are refused", () => {
    const m = tiny();
    const src = readFloatWeights(m.path);
    const tensors = [...widenTensors(src, { width: 1 })].reverse();
    expect(() => writeGGUF(join(dir, "bad.gguf"), src.config, tensors, "F32", ggufModelMetadata(src.config, "F32", "bad"))).toThrow(/expected/);
    src.close();
  });
});

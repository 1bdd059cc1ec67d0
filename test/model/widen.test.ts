// Function-preserving widening: the widened model computes the original's logits, in
// the float64 reference and in the engine's own forward (GGUF and safetensors outputs).

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { loadModel } from "../../src/model/registry";
import { dequantize, encodeQ8_0 } from "../../src/model/encoding";
import { readFloatWeights, widenedConfig, widenModel, widenTensors, type WidenSpec } from "../../src/model/widen";
import { ggufModelMetadata, writeGGUF } from "../../src/model/write";
import { referenceForward } from "../helpers/reference-llama";
import { writeTinyModel, type TinyModelOptions } from "../helpers/tiny-model";
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
    const original = loadModel(m.path, backend, { maxBatchTokens: 64 });
    const want = chainLogits(original, PROMPT);
    original.close();
    for (const dst of [join(dir, "wide.gguf"), join(dir, "wide-hf")]) {
      widenModel(m.path, dst, spec, { dtype: "F32" });
      const wide = loadModel(dst, backend, { maxBatchTokens: 64 });
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
    const original = loadModel(m.path, backend, { maxBatchTokens: 64 });
    const want = chainLogits(original, PROMPT);
    original.close();
    const dst = join(dir, "wide-f16.gguf");
    widenModel(m.path, dst, spec, { dtype: "F16" });
    const wide = loadModel(dst, backend, { maxBatchTokens: 64 });
    const got = chainLogits(wide, PROMPT);
    wide.close();
    expect(maxRelError(got, want)).toBeLessThan(1e-2);
  });
});

describe("writer", () => {
  test("Q8_0 encoder follows ggml's rule: d = amax / 127, halves rounded away from zero", () => {
    const values = new Float32Array(96);
    // Block 0: amax 127, so d = 1 and q = roundf(x); JS's Math.round would give -63, 0, 2.
    values.set([127, -63.5, 0.5, -0.5, 1.49, 2.5, -127, 100.5]);
    // Block 1 stays all zero: d = 0 and every q 0. Block 2: the same values / 4 (d = 0.25).
    for (let i = 0; i < 8; i++) values[64 + i] = values[i]! / 4;
    const bytes = encodeQ8_0(values);
    const view = new DataView(bytes.buffer);
    expect(bytes.length).toBe(3 * 34);
    const known = [127, -64, 1, -1, 1, 3, -127, 101];
    expect(view.getUint16(0, true)).toBe(0x3c00); // f16 1.0
    expect(Array.from(new Int8Array(bytes.buffer, 2, 8))).toEqual(known);
    expect(Array.from(bytes.subarray(34, 68))).toEqual(new Array(34).fill(0));
    expect(view.getUint16(68, true)).toBe(0x3400); // f16 0.25
    expect(Array.from(new Int8Array(bytes.buffer, 70, 8))).toEqual(known);
    const back = dequantize(DType.Q8_0, bytes, values.length);
    expect(Array.from(back.subarray(0, 8))).toEqual(known);
    expect(Array.from(back.subarray(64, 72))).toEqual(known.map((q) => q / 4));
  });

  test("tensors out of order are refused", () => {
    const m = tiny();
    const src = readFloatWeights(m.path);
    const tensors = [...widenTensors(src, { width: 1 })].reverse();
    expect(() => writeGGUF(join(dir, "bad.gguf"), src.config, tensors, "F32", ggufModelMetadata(src.config, "F32", "bad"))).toThrow(/expected/);
    src.close();
  });
});

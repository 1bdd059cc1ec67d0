// Model formats: the tiny-model writer and the parsers agree, the vendored models read
// the same from safetensors and GGUF, and quantizers follow GGML's rules.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType, RopeLayout } from "../../src/backend/backend.ts";
import { ropeInvFreq, type ModelConfig } from "../../src/model/config.ts";
import { configFromHF, expectedTensors, ggufNameFromHF, hfNameFromGGUF } from "../../src/model/registry.ts";
import { readGGUF } from "../../src/model/gguf.ts";
import { loadModelFiles, type LoadedModel, type TensorRef } from "../../src/model/load.ts";
import { readMapped } from "../helpers/mapped.ts";
import {
  dequantize, f16BitsToF32, f32ToBF16Bits, f32ToF16Bits, unpermuteRowsFromGGUF,
} from "../../src/model/encoding.ts";
import {
  quantizeQ4_0, quantizeQ8_0, writeTinyModel, type TinyDims, type TinyDType, type TinyModelOptions,
} from "../helpers/tiny-model.ts";

const tmp = mkdtempSync(join(tmpdir(), "specinfer-formats-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const DIMS: TinyDims = { vocab: 48, hidden: 64, intermediate: 96, layers: 2, heads: 4, kvHeads: 2 };
let dirCount = 0;
const freshDir = () => join(tmp, `m${dirCount++}`);

function tensorValues(ref: TensorRef): Float32Array {
  const count = ref.shape.reduce((a, b) => a * b, 1);
  return dequantize(ref.dtype, ref.file.bytes.subarray(ref.offset, ref.offset + ref.bytes), count);
}

/** Values in HF row order: undoes the GGUF q/k permutation when the layout needs it. */
function hfValues(model: LoadedModel, name: string): Float32Array {
  const v = tensorValues(model.tensors.get(name)!);
  if (model.ropeLayout !== RopeLayout.Interleaved) return v;
  const c = model.config;
  if (name.endsWith("q_proj.weight")) return unpermuteRowsFromGGUF(v, c.numHeads, c.headDim);
  if (name.endsWith("k_proj.weight")) return unpermuteRowsFromGGUF(v, c.numKvHeads, c.headDim);
  return v;
}

function roundTrip(opts: Omit<TinyModelOptions, "seed" | "dims"> & { dims?: TinyDims }) {
  const written = writeTinyModel(freshDir(), { seed: 7, dims: DIMS, ...opts });
  const model = loadModelFiles(written.path, readMapped);
  try {
    expect(model.format).toBe(opts.format);
    expect(model.config).toEqual(written.config);
    expect([...model.tensors.keys()].sort()).toEqual([...written.weights.keys()].sort());
    for (const t of expectedTensors(model.config)) {
      const ref = model.tensors.get(t.name)!;
      expect(ref.shape).toEqual(t.shape);
      expect(ref.offset + ref.bytes).toBeLessThanOrEqual(ref.file.size);
      expect(hfValues(model, t.name)).toEqual(written.weights.get(t.name)!);
    }
  } finally {
    model.close();
  }
  return written;
}

describe("tiny-model writer round trip", () => {
  const cases: [TinyDType, "safetensors" | "gguf"][] = [
    ["F32", "safetensors"], ["F16", "safetensors"], ["BF16", "safetensors"],
    ["F32", "gguf"], ["F16", "gguf"], ["BF16", "gguf"], ["Q8_0", "gguf"], ["Q4_0", "gguf"],
  ];
  for (const [dtype, format] of cases) {
    test(`${dtype} ${format}`, () => {
      roundTrip({ dtype, format });
    });
  }

  test("tied embeddings: no lm_head in either format", () => {
    for (const format of ["safetensors", "gguf"] as const) {
      const m = roundTrip({ dtype: "F16", format, tied: true });
      expect(m.weights.has("lm_head.weight")).toBe(false);
      expect(m.config.tieWordEmbeddings).toBe(true);
    }
  });

  test("q/k/v biases (qwen2) in both formats; qwen2 GGUF keeps HF rows", () => {
    for (const format of ["safetensors", "gguf"] as const) {
      const m = roundTrip({ dtype: "F32", format, attentionBias: true });
      expect(m.weights.has("model.layers.1.self_attn.k_proj.bias")).toBe(true);
      const model = loadModelFiles(m.path, readMapped);
      expect(model.ropeLayout).toBe(RopeLayout.Half);
      expect(model.config.arch).toBe("qwen2");
      model.close();
    }
  });

  test("headDim other than hidden/heads survives both formats", () => {
    for (const format of ["safetensors", "gguf"] as const) {
      roundTrip({ dtype: "F32", format, dims: { ...DIMS, headDim: 24 } });
    }
  });

  test("sharded safetensors with model.safetensors.index.json", () => {
    const m = roundTrip({ dtype: "BF16", format: "safetensors", shards: 3 });
    const model = loadModelFiles(m.path, readMapped);
    expect(model.files.length).toBe(3);
    model.close();
  });

  test("one seed gives the same model in both formats", () => {
    const a = writeTinyModel(freshDir(), { seed: 3, dims: DIMS, dtype: "F16", format: "safetensors" });
    const b = writeTinyModel(freshDir(), { seed: 3, dims: DIMS, dtype: "F16", format: "gguf" });
    expect(b.weights).toEqual(a.weights);
    const c = writeTinyModel(freshDir(), { seed: 4, dims: DIMS, dtype: "F16", format: "gguf" });
    expect(c.weights.get("model.norm.weight")).not.toEqual(a.weights.get("model.norm.weight"));
  });

  test("rope scaling (llama3, linear) and theta survive both formats", () => {
    const scalings: TinyModelOptions["ropeScaling"][] = [
      { type: "llama3", factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 64 },
      { type: "linear", factor: 2.5 },
    ];
    for (const ropeScaling of scalings) {
      const freqs = (["safetensors", "gguf"] as const).map((format) => {
        const m = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format, ropeScaling, ropeTheta: 500000 });
        const model = loadModelFiles(m.path, readMapped);
        expect(model.config.ropeScaling).toEqual(ropeScaling!);
        expect(model.config.ropeTheta).toBe(500000);
        model.close();
        return ropeInvFreq(model.config);
      });
      expect(freqs[1]).toEqual(freqs[0]!);
    }
  });
});

test("GGUF rope_freqs.weight becomes ropeFreqFactors and divides the frequencies", () => {
  const factors = Float32Array.from({ length: 8 }, (_, j) => 1 + j); // DIMS: headDim 16, 8 pairs
  const m = writeTinyModel(freshDir(), { seed: 2, dims: DIMS, dtype: "F16", format: "gguf", ropeFreqFactors: factors });
  const model = loadModelFiles(m.path, readMapped);
  model.close();
  expect(model.config.ropeFreqFactors).toEqual(factors);
  const plain = ropeInvFreq({ ...model.config, ropeFreqFactors: undefined });
  const scaled = ropeInvFreq(model.config);
  for (let j = 0; j < 8; j++) expect(scaled[j]).toBe(Math.fround(10000 ** (-2 * j / 16) / (1 + j)));
  expect(plain[3]).toBe(Math.fround(10000 ** (-6 / 16)));
});

describe("ropeInvFreq", () => {
  const base: ModelConfig = configFromHF("config.json", JSON.stringify({
    architectures: ["LlamaForCausalLM"], vocab_size: 10, hidden_size: 128, intermediate_size: 64,
    num_hidden_layers: 1, num_attention_heads: 1, rope_theta: 500000,
  }));

  test("unscaled: theta^(-2j/d)", () => {
    const f = ropeInvFreq(base);
    expect(f.length).toBe(64);
    expect(f[0]).toBe(1);
    expect(f[10]).toBe(Math.fround(500000 ** (-20 / 128)));
  });

  test("llama3: low frequencies divided by factor, high kept, middle blended", () => {
    const scaling = { type: "llama3" as const, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 };
    const plain = ropeInvFreq(base);
    const scaled = ropeInvFreq({ ...base, ropeScaling: scaling });
    let kept = 0, divided = 0, blended = 0;
    for (let j = 0; j < 64; j++) {
      const inv = 500000 ** ((-2 * j) / 128);
      const wavelen = (2 * Math.PI) / inv;
      if (wavelen < 8192 / 4) {
        expect(scaled[j]).toBe(plain[j]!);
        kept++;
      } else if (wavelen > 8192 / 1) {
        expect(scaled[j]).toBe(Math.fround(inv / 8));
        divided++;
      } else {
        const smooth = (8192 / wavelen - 1) / (4 - 1);
        expect(scaled[j]).toBe(Math.fround((1 - smooth) * (inv / 8) + smooth * inv));
        blended++;
      }
    }
    expect(kept * divided * blended).toBeGreaterThan(0);
  });

  test("linear divides every frequency", () => {
    const f = ropeInvFreq({ ...base, ropeScaling: { type: "linear", factor: 4 } });
    expect(f[5]).toBe(Math.fround(500000 ** (-10 / 128) / 4));
  });
});

describe("GGML number formats", () => {
  test("f16: round to nearest even, subnormals, overflow", () => {
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(65504)).toBe(0x7bff);
    expect(f32ToF16Bits(65520)).toBe(0x7c00); // the tie above max rounds to infinity
    expect(f32ToF16Bits(-(2 ** -24))).toBe(0x8001);
    expect(f32ToF16Bits(2 ** -25)).toBe(0); // tie between 0 and the smallest subnormal: even
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie: down to even
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie: up to even
    // Against the rounding done in float64 arithmetic: 11 significant bits (fewer below
    // 2^-14), ties to even, overflow past 65520 to infinity.
    const nearestF16 = (x: number) => {
      const ulp = 2 ** (Math.max(Math.floor(Math.log2(Math.abs(x))), -14) - 10);
      const q = x / ulp;
      const f = Math.floor(q);
      const r = q - f > 0.5 || (q - f === 0.5 && f % 2 !== 0) ? f + 1 : f;
      const v = r * ulp;
      if (v === 0) return x < 0 ? -0 : 0;
      return Math.abs(v) >= 65520 ? Math.sign(v) * Infinity : v;
    };
    for (let i = 0; i < 2000; i++) {
      const x = Math.fround((Math.sin(i * 12.9898) * 43758.5453) % 1) * 2 ** ((i % 48) - 34);
      if (x === 0) continue;
      expect(f16BitsToF32(f32ToF16Bits(x))).toBe(nearestF16(x));
    }
  });

  test("bf16: round to nearest even", () => {
    expect(f32ToBF16Bits(1)).toBe(0x3f80);
    expect(f32ToBF16Bits(1 + 2 ** -8)).toBe(0x3f80); // tie: down to even
    expect(f32ToBF16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82); // tie: up to even
    expect(f32ToBF16Bits(-Infinity)).toBe(0xff80);
  });

  test("Q8_0: d = amax/127 as f16, q = round half away from zero", () => {
    const x = new Float32Array(32);
    x[0] = 1.27;
    x[1] = -0.005; // -0.5 of a step: away from zero -> -1
    x[2] = 0.015;
    const { data, stored } = quantizeQ8_0(x);
    const d = f16BitsToF32(f32ToF16Bits(Math.fround(1.27 / 127)));
    expect(new DataView(data.buffer).getUint16(0, true)).toBe(f32ToF16Bits(Math.fround(1.27 / 127)));
    expect(new Int8Array(data.buffer, 2, 3)).toEqual(new Int8Array([127, -1, 2]));
    expect(stored[0]).toBe(Math.fround(127 * d));
    expect(dequantize(DType.Q8_0, data, 32)).toEqual(stored);
  });

  test("Q4_0: d = -max/8 from the signed extreme, nibbles j | (j+16) << 4", () => {
    const x = new Float32Array(32);
    x[0] = -0.8; // largest magnitude, negative: d = 0.1, q = 0
    x[16] = 0.7; // q = trunc(7 + 8.5) clamped to 15
    x[1] = -0.06; // q = trunc(-0.6 + 8.5) = 7 (truncates where rounding gives 8)
    const { data, stored } = quantizeQ4_0(x);
    const d = f16BitsToF32(f32ToF16Bits(Math.fround(0.8 / 8)));
    expect(data[2]).toBe(0 | (15 << 4));
    expect(data[3]! & 15).toBe(7);
    expect(stored[0]).toBe(Math.fround(-8 * d));
    expect(stored[16]).toBe(Math.fround(7 * d));
    expect(dequantize(DType.Q4_0, data, 32)).toEqual(stored);
  });
});

describe("name mapping", () => {
  test("GGUF <-> HF names are inverse over the whole table", () => {
    const cfg = { ...writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "gguf", attentionBias: true }).config };
    for (const t of expectedTensors({ ...cfg, tieWordEmbeddings: false })) {
      const g = ggufNameFromHF(t.name, cfg.arch);
      expect(g).not.toBeNull();
      expect(hfNameFromGGUF(g!, cfg.arch)).toBe(t.name);
    }
    expect(hfNameFromGGUF("blk.3.attn_q.weight", "llama")).toBe("model.layers.3.self_attn.q_proj.weight");
    expect(hfNameFromGGUF("rope_freqs.weight", "llama")).toBeNull();
  });
});

describe("vendored models", () => {
  for (const name of ["llama-shakespeare-8m", "llama-shakespeare-1.4m-draft"]) {
    test(`${name}: safetensors and GGUF agree`, () => {
      const st = loadModelFiles(`models/${name}`, readMapped);
      const gg = loadModelFiles(`models/${name}/model.gguf`, readMapped);
      try {
        expect(gg.config).toEqual(st.config);
        expect(st.config.rmsNormEps).toBe(1e-5);
        expect(st.ropeLayout).toBe(RopeLayout.Half);
        expect(gg.ropeLayout).toBe(RopeLayout.Interleaved);
        expect([...gg.tensors.keys()].sort()).toEqual([...st.tensors.keys()].sort());
        const { numHeads, numKvHeads, headDim } = st.config;
        for (const [tname, s] of st.tensors) {
          const g = gg.tensors.get(tname)!;
          expect(g.shape).toEqual(s.shape);
          expect(s.dtype).toBe(DType.F16);
          const sBytes = s.file.bytes.subarray(s.offset, s.offset + s.bytes);
          const gBytes = g.file.bytes.subarray(g.offset, g.offset + g.bytes);
          if (s.shape.length === 1) {
            // Norms are F32 in the GGUF, F16 in the safetensors: same values.
            expect(g.dtype).toBe(DType.F32);
            expect(tensorValues(g)).toEqual(tensorValues(s));
            continue;
          }
          expect(g.dtype).toBe(DType.F16);
          const heads = tname.endsWith("q_proj.weight") ? numHeads : tname.endsWith("k_proj.weight") ? numKvHeads : 0;
          if (heads === 0) {
            expect(Buffer.compare(gBytes, sBytes)).toBe(0);
            continue;
          }
          // MODEL_CARD.md: within each head, GGUF row 2i = HF row i, 2i+1 = HF row i + D/2.
          const rowBytes = s.shape[1]! * 2;
          for (let h = 0; h < heads; h++) {
            for (let i = 0; i < headDim / 2; i++) {
              const row = (b: Uint8Array, r: number) => b.subarray((h * headDim + r) * rowBytes, (h * headDim + r + 1) * rowBytes);
              expect(Buffer.compare(row(gBytes, 2 * i), row(sBytes, i))).toBe(0);
              expect(Buffer.compare(row(gBytes, 2 * i + 1), row(sBytes, i + headDim / 2))).toBe(0);
            }
          }
        }
      } finally {
        st.close();
        gg.close();
      }
    });
  }

  test("GGUF metadata: tokenizer arrays and strings decode", () => {
    const g = readGGUF(readMapped("models/llama-shakespeare-1.4m-draft/model.gguf"));
    expect(g.version).toBe(3);
    const tokens = g.metadata.get("tokenizer.ggml.tokens") as string[];
    expect(tokens.length).toBe(4096);
    expect(tokens.slice(0, 3)).toEqual(["<unk>", "<s>", "</s>"]);
    expect((g.metadata.get("tokenizer.ggml.scores") as Float32Array).length).toBe(4096);
    expect((g.metadata.get("tokenizer.ggml.token_type") as Int32Array)[1]).toBe(3);
    expect(g.metadata.get("tokenizer.ggml.add_bos_token")).toBe(true);
    expect(g.dataOffset % 32).toBe(0);
  });
});

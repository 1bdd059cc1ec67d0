// Function-preserving widening (Net2Net style): from a model's float weights, a wider
// and deeper model that computes the same logits. Benchmarks use it to turn the small
// trained pair into a pair of realistic cost whose drafts agree with the target as
// often as the trained ones do.
//
// With a residual width factor k, heads factor m and FFN factor p (HF layout, [out, in]):
//   residual channel c becomes channels c*k .. c*k+k-1, all holding x[c]. RMSNorm's mean
//     of squares is unchanged, so norm outputs are repeated too (norm weights repeated);
//   every linear that reads the residual stream divides its weights by k across the k
//     copies of an input channel, so it computes the same sum;
//   attention heads are tiled m times (query head r*H+h copies head h, kv head r*KV+g
//     copies g, so GQA groups still line up), o_proj divides by m across the copies;
//   FFN neurons are tiled p times, down_proj divides by p;
//   rows of o_proj / down_proj / the embedding are repeated per residual copy;
//   extra layers (copies of existing ones) have o_proj = down_proj = 0: they add nothing
//     to the residual stream but cost a full layer.
// lm_head reads the residual (divided by k) while the embedding writes it (not divided),
// so a tied model comes out untied.
//
// The widened model is written by write.ts's streaming GGUF writer (one tensor in memory
// at a time, so multi-GB models can be made on a small machine) or as safetensors.

import { readFileSync } from "node:fs";
import type { MappedFile } from "../backend/backend.ts";
import { expectedTensors } from "./registry.ts";
import type { ModelConfig } from "./config.ts";
import { dequantize, unpermuteRowsFromGGUF, type WriteDType } from "./encoding.ts";
import { loadModelFiles, type LoadedModel } from "./load.ts";
import { ggufModelMetadata, ggufTokenizerMetadata, writeGGUF, writeSafetensors, type NamedTensor } from "./write.ts";

export interface WidenSpec {
  /** Residual width factor k (hidden size × k). */
  width: number;
  /** Attention heads factor m (query and KV heads × m); default k. */
  heads?: number;
  /** FFN neurons factor p (intermediate size × p); default k. */
  ffn?: number;
  /** Zero-output layers appended after the original ones; default 0. */
  extraLayers?: number;
}

/** A model's float weights by HF name, read lazily from its files (HF layout). */
export interface FloatWeights {
  config: ModelConfig;
  get(name: string): Float32Array;
  close(): void;
}

export function widenedConfig(c: ModelConfig, spec: WidenSpec): ModelConfig {
  // The rules below know the LLaMA family's tensors only.
  if (!["llama", "mistral", "qwen2"].includes(c.arch)) throw new Error(`widen: ${c.arch} models are not supported (LLaMA family only)`);
  const { k, m, p, extra } = factors(spec);
  return {
    ...c,
    hiddenSize: c.hiddenSize * k,
    numHeads: c.numHeads * m,
    numKvHeads: c.numKvHeads * m,
    intermediateSize: c.intermediateSize * p,
    numLayers: c.numLayers + extra,
    tieWordEmbeddings: k === 1 ? c.tieWordEmbeddings : false,
  };
}

/** The widened model's tensors, one at a time, in expectedTensors order. */
export function* widenTensors(src: FloatWeights, spec: WidenSpec): Generator<NamedTensor> {
  const c = src.config;
  const { k, m, p } = factors(spec);
  const out = widenedConfig(c, spec);
  const hd = c.headDim;
  const residual = (i: number) => Math.floor(i / k);
  // Tiled copies: new head r*H + h is old head h.
  const qFeature = (f: number) => ((Math.floor(f / hd) % c.numHeads) * hd) + (f % hd);
  const kvFeature = (f: number) => ((Math.floor(f / hd) % c.numKvHeads) * hd) + (f % hd);
  const neuron = (n: number) => n % c.intermediateSize;
  const embedName = "model.embed_tokens.weight";
  const headName = c.tieWordEmbeddings ? embedName : "lm_head.weight";

  for (const t of expectedTensors(out)) {
    const layer = /^model\.layers\.(\d+)\.(.+)$/.exec(t.name);
    let values: Float32Array;
    if (!layer) {
      if (t.name === embedName) values = remap(src.get(embedName), c.hiddenSize, t.shape, (r) => r, residual, 1);
      else if (t.name === "lm_head.weight") values = remap(src.get(headName), c.hiddenSize, t.shape, (r) => r, residual, 1 / k);
      else values = remap1(src.get(t.name), t.shape[0]!, residual);
    } else {
      const l = Number(layer[1]);
      const zeroOutput = l >= c.numLayers;
      const from = `model.layers.${l % c.numLayers}.${layer[2]}`;
      const w = () => src.get(from);
      switch (layer[2]) {
        case "input_layernorm.weight":
        case "post_attention_layernorm.weight":
          values = remap1(w(), t.shape[0]!, residual);
          break;
        case "self_attn.q_proj.weight":
          values = remap(w(), c.hiddenSize, t.shape, qFeature, residual, 1 / k);
          break;
        case "self_attn.k_proj.weight":
        case "self_attn.v_proj.weight":
          values = remap(w(), c.hiddenSize, t.shape, kvFeature, residual, 1 / k);
          break;
        case "self_attn.q_proj.bias":
          values = remap1(w(), t.shape[0]!, qFeature);
          break;
        case "self_attn.k_proj.bias":
        case "self_attn.v_proj.bias":
          values = remap1(w(), t.shape[0]!, kvFeature);
          break;
        case "self_attn.o_proj.weight":
          values = zeroOutput ? new Float32Array(t.shape[0]! * t.shape[1]!) : remap(w(), c.numHeads * hd, t.shape, residual, qFeature, 1 / m);
          break;
        case "mlp.gate_proj.weight":
        case "mlp.up_proj.weight":
          values = remap(w(), c.hiddenSize, t.shape, neuron, residual, 1 / k);
          break;
        case "mlp.down_proj.weight":
          values = zeroOutput ? new Float32Array(t.shape[0]! * t.shape[1]!) : remap(w(), c.intermediateSize, t.shape, residual, neuron, 1 / p);
          break;
        default:
          throw new Error(`widen: no rule for ${t.name}`);
      }
    }
    yield { name: t.name, shape: t.shape, values };
  }
}

/** out[r, c] = W[rowOf(r), colOf(c)] * scale, W being [*, oldCols]. */
function remap(
  W: Float32Array, oldCols: number, shape: number[], rowOf: (r: number) => number, colOf: (c: number) => number, scale: number,
): Float32Array {
  const [rows, cols] = shape as [number, number];
  const out = new Float32Array(rows * cols);
  const cols0 = new Int32Array(cols);
  for (let j = 0; j < cols; j++) cols0[j] = colOf(j);
  for (let r = 0; r < rows; r++) {
    const base = rowOf(r) * oldCols;
    const o = r * cols;
    for (let j = 0; j < cols; j++) out[o + j] = W[base + cols0[j]!]! * scale;
  }
  return out;
}

function remap1(v: Float32Array, n: number, indexOf: (i: number) => number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = v[indexOf(i)]!;
  return out;
}

function factors(spec: WidenSpec) {
  const k = spec.width;
  const m = spec.heads ?? k;
  const p = spec.ffn ?? k;
  const extra = spec.extraLayers ?? 0;
  for (const [name, v] of [["width", k], ["heads", m], ["ffn", p]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`widen: ${name} factor must be a positive integer, got ${v}`);
  }
  if (!Number.isInteger(extra) || extra < 0) throw new Error(`widen: extraLayers must be a non-negative integer, got ${extra}`);
  return { k, m, p, extra };
}

// ---- reading float weights -----------------------------------------------------

function readMapped(path: string): MappedFile {
  const bytes = new Uint8Array(readFileSync(path));
  return { path, size: bytes.byteLength, bytes, ptr: 0, close() {} };
}

/** Float weights of an HF directory or GGUF file, HF layout: the q/k rows of a
 *  llama-arch GGUF are un-permuted back to rotate_half order. */
export function readFloatWeights(path: string): FloatWeights {
  const files: LoadedModel = loadModelFiles(path, readMapped);
  const c = files.config;
  return {
    config: c,
    get(name: string): Float32Array {
      const t = files.tensors.get(name);
      if (!t) throw new Error(`${path}: missing tensor ${name}`);
      const values = dequantize(t.dtype, t.file.bytes.subarray(t.offset, t.offset + t.bytes), t.shape.reduce((a, b) => a * b, 1));
      const heads = name.endsWith("q_proj.weight") ? c.numHeads : name.endsWith("k_proj.weight") ? c.numKvHeads : 0;
      return files.format === "gguf" && c.arch !== "qwen2" && heads > 0 ? unpermuteRowsFromGGUF(values, heads, c.headDim) : values;
    },
    close: () => files.close(),
  };
}

/**
 * Widens the model at `src` (HF directory or GGUF) and writes it to `dst`: a .gguf path
 * (tokenizer keys copied from src's GGUF or from a GGUF beside its safetensors) or a
 * directory (safetensors; tokenizer files are the caller's to copy). Returns the config.
 */
export function widenModel(src: string, dst: string, spec: WidenSpec, opts: { dtype: WriteDType; tokenizerFrom?: string; name?: string }): ModelConfig {
  const weights = readFloatWeights(src);
  try {
    const config = widenedConfig(weights.config, spec);
    const tensors = widenTensors(weights, spec);
    if (dst.endsWith(".gguf")) {
      const meta = ggufModelMetadata(config, opts.dtype, opts.name ?? "widened");
      if (opts.tokenizerFrom) {
        const tok = loadModelFiles(opts.tokenizerFrom, readMapped);
        try {
          Object.assign(meta, ggufTokenizerMetadata(tok.gguf?.metadata ?? new Map()));
        } finally {
          tok.close();
        }
      }
      writeGGUF(dst, config, tensors, opts.dtype, meta);
    } else {
      writeSafetensors(dst, config, tensors, opts.dtype);
    }
    return config;
  } finally {
    weights.close();
  }
}

// Writes seeded random tiny LLaMA-family models as an HF directory (config.json +
// safetensors, optionally sharded) or a GGUF file, and returns the exact float weights
// the engine will see (after the dtype's rounding or quantize-dequantize round trip),
// in HF layout, for reference forwards. The same seed gives the same weights in every
// format, so an HF dir and a GGUF written from one seed are the same model.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DType } from "../../src/backend/backend.ts";
import { expectedTensors, ggufNameFromHF } from "../../src/model/arch.ts";
import type { ModelConfig, RopeScaling } from "../../src/model/config.ts";
import { GGUFValueType } from "../../src/model/gguf.ts";

export type TinyDType = "F32" | "F16" | "BF16" | "Q8_0" | "Q4_0";

export interface TinyDims {
  vocab: number;
  hidden: number;
  intermediate: number;
  layers: number;
  heads: number;
  kvHeads: number;
  /** Defaults to hidden / heads. */
  headDim?: number;
}

export interface TinyModelOptions {
  seed: number;
  dims: TinyDims;
  dtype: TinyDType;
  format: "safetensors" | "gguf";
  tied?: boolean;
  /** q/k/v biases; written as a Qwen2 model (HF Qwen2ForCausalLM, GGUF arch qwen2). */
  attentionBias?: boolean;
  ropeTheta?: number;
  ropeScaling?: RopeScaling;
  maxPositionEmbeddings?: number;
  rmsNormEps?: number;
  /** safetensors only: split into this many shards with model.safetensors.index.json. */
  shards?: number;
  /** GGUF only: writes `rope_freqs.weight` (llama.cpp's form of Llama-3 RoPE scaling). */
  ropeFreqFactors?: Float32Array;
  /** GGUF only: extra metadata (e.g. a tokenizer), added after the model keys. */
  ggufMetadata?: Record<string, GGUFMetaValue>;
}

export interface TinyModel {
  /** What to pass to loadModelFiles: the directory (safetensors) or the .gguf file. */
  path: string;
  config: ModelConfig;
  /** HF name -> values in HF layout ([out, in] row-major), exactly as stored. */
  weights: Map<string, Float32Array>;
}

const BOS = 1;
const EOS = 2;

export function writeTinyModel(dir: string, opts: TinyModelOptions): TinyModel {
  const config = tinyConfig(opts);
  if (opts.ropeFreqFactors && opts.format !== "gguf") throw new Error("ropeFreqFactors exist only in GGUF files");
  if ((opts.dtype === "Q8_0" || opts.dtype === "Q4_0") && opts.format === "safetensors") {
    throw new Error(`safetensors cannot hold ${opts.dtype}; use format "gguf"`);
  }
  const rng = new Rng(opts.seed);
  const source = new Map<string, Float32Array>();
  for (const t of expectedTensors(config)) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    const values = new Float32Array(count);
    if (t.kind === "norm") for (let i = 0; i < count; i++) values[i] = 1 + 0.1 * rng.normal();
    else if (t.kind === "bias") for (let i = 0; i < count; i++) values[i] = 0.1 * rng.normal();
    else {
      // Embeddings/lm_head at 2/sqrt(hidden) give logits of std ~2 (tied or not);
      // linears at 1/sqrt(in) keep activations near unit scale.
      const isVocab = t.name === "model.embed_tokens.weight" || t.name === "lm_head.weight";
      const std = isVocab ? 2 / Math.sqrt(config.hiddenSize) : 1 / Math.sqrt(t.shape[1]!);
      for (let i = 0; i < count; i++) values[i] = std * rng.normal();
    }
    source.set(t.name, values);
  }

  mkdirSync(dir, { recursive: true });
  if (opts.format === "safetensors") {
    const weights = writeHF(dir, config, opts, source);
    return { path: dir, config, weights };
  }
  const path = join(dir, "model.gguf");
  const weights = writeGGUFModel(path, config, opts, source);
  return { path, config, weights };
}

function tinyConfig(opts: TinyModelOptions): ModelConfig {
  const d = opts.dims;
  const headDim = d.headDim ?? d.hidden / d.heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) throw new Error(`head dim ${headDim} must be an even integer`);
  if (opts.dtype === "Q8_0" || opts.dtype === "Q4_0") {
    for (const k of [d.hidden, d.intermediate, d.heads * headDim]) {
      if (k % 32 !== 0) throw new Error(`${opts.dtype} needs input dims that are multiples of 32, got ${k}`);
    }
  }
  return {
    arch: opts.attentionBias ? "qwen2" : "llama",
    vocabSize: d.vocab,
    hiddenSize: d.hidden,
    intermediateSize: d.intermediate,
    numLayers: d.layers,
    numHeads: d.heads,
    numKvHeads: d.kvHeads,
    headDim,
    rmsNormEps: opts.rmsNormEps ?? 1e-5,
    ropeTheta: opts.ropeTheta ?? 10000,
    ropeScaling: opts.ropeScaling ?? null,
    maxPositionEmbeddings: opts.maxPositionEmbeddings ?? 256,
    tieWordEmbeddings: opts.tied ?? false,
    attentionBias: opts.attentionBias ?? false,
    bosTokenId: d.vocab > BOS ? BOS : null,
    eosTokenIds: d.vocab > EOS ? [EOS] : [],
    ...(opts.ropeFreqFactors ? { ropeFreqFactors: opts.ropeFreqFactors } : {}),
  };
}

// ---- HF directory -----------------------------------------------------------

const TORCH_DTYPE = { F32: "float32", F16: "float16", BF16: "bfloat16" };

function writeHF(dir: string, cfg: ModelConfig, opts: TinyModelOptions, source: Map<string, Float32Array>): Map<string, Float32Array> {
  const json: Record<string, unknown> = {
    architectures: [cfg.arch === "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"],
    model_type: cfg.arch,
    hidden_act: "silu",
    vocab_size: cfg.vocabSize,
    hidden_size: cfg.hiddenSize,
    intermediate_size: cfg.intermediateSize,
    num_hidden_layers: cfg.numLayers,
    num_attention_heads: cfg.numHeads,
    num_key_value_heads: cfg.numKvHeads,
    head_dim: cfg.headDim,
    rms_norm_eps: cfg.rmsNormEps,
    rope_theta: cfg.ropeTheta,
    rope_scaling: hfRopeScaling(cfg.ropeScaling),
    max_position_embeddings: cfg.maxPositionEmbeddings,
    tie_word_embeddings: cfg.tieWordEmbeddings,
    bos_token_id: cfg.bosTokenId,
    eos_token_id: cfg.eosTokenIds[0] ?? null,
    torch_dtype: TORCH_DTYPE[opts.dtype as "F32" | "F16" | "BF16"],
  };
  writeFileSync(join(dir, "config.json"), JSON.stringify(json, null, 2));

  const stDtype = opts.dtype as "F32" | "F16" | "BF16";
  const weights = new Map<string, Float32Array>();
  const encoded: SafetensorsEntry[] = [];
  for (const [name, values] of source) {
    const { data, stored } = encodeFloat(values, stDtype);
    weights.set(name, stored);
    encoded.push({ name, dtype: stDtype, shape: expectedShape(cfg, name), data });
  }

  const shards = opts.shards ?? 1;
  if (shards <= 1) {
    writeFileSync(join(dir, "model.safetensors"), encodeSafetensors(encoded));
    return weights;
  }
  const weightMap: Record<string, string> = {};
  const perShard = Math.ceil(encoded.length / shards);
  for (let s = 0; s < shards; s++) {
    const file = `model-${String(s + 1).padStart(5, "0")}-of-${String(shards).padStart(5, "0")}.safetensors`;
    const part = encoded.slice(s * perShard, (s + 1) * perShard);
    for (const t of part) weightMap[t.name] = file;
    writeFileSync(join(dir, file), encodeSafetensors(part));
  }
  const totalSize = encoded.reduce((a, t) => a + t.data.byteLength, 0);
  writeFileSync(
    join(dir, "model.safetensors.index.json"),
    JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2),
  );
  return weights;
}

function hfRopeScaling(s: RopeScaling): unknown {
  if (s === null) return null;
  if (s.type === "linear") return { type: "linear", factor: s.factor };
  return {
    rope_type: "llama3",
    factor: s.factor,
    low_freq_factor: s.lowFreqFactor,
    high_freq_factor: s.highFreqFactor,
    original_max_position_embeddings: s.originalMaxPositionEmbeddings,
  };
}

function expectedShape(cfg: ModelConfig, name: string): number[] {
  return expectedTensors(cfg).find((t) => t.name === name)!.shape;
}

export interface SafetensorsEntry {
  name: string;
  /** Any safetensors dtype string; tests of unsupported dtypes pass e.g. "I64". */
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** A safetensors file: header padded with spaces to 8 bytes, tensors back to back. */
export function encodeSafetensors(tensors: SafetensorsEntry[], metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.byteLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.byteLength), true);
  out.set(headerBytes, 8);
  let at = 8 + headerBytes.byteLength;
  for (const t of tensors) {
    out.set(t.data, at);
    at += t.data.byteLength;
  }
  return out;
}

// ---- GGUF -------------------------------------------------------------------

const GGUF_FILE_TYPE: Record<TinyDType, number> = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 7, BF16: 32 };
const GGUF_DTYPE: Record<TinyDType, DType> = {
  F32: DType.F32, F16: DType.F16, BF16: DType.BF16, Q8_0: DType.Q8_0, Q4_0: DType.Q4_0,
};

function writeGGUFModel(path: string, cfg: ModelConfig, opts: TinyModelOptions, source: Map<string, Float32Array>): Map<string, Float32Array> {
  const a = cfg.arch;
  const f32 = (v: number) => gv(GGUFValueType.FLOAT32, v);
  const u32 = (v: number) => gv(GGUFValueType.UINT32, v);
  const meta: Record<string, GGUFMetaValue> = {
    "general.architecture": a,
    "general.name": "tiny",
    "general.file_type": u32(GGUF_FILE_TYPE[opts.dtype]),
    "general.alignment": u32(32),
    [`${a}.vocab_size`]: u32(cfg.vocabSize),
    [`${a}.context_length`]: u32(cfg.maxPositionEmbeddings),
    [`${a}.embedding_length`]: u32(cfg.hiddenSize),
    [`${a}.block_count`]: u32(cfg.numLayers),
    [`${a}.feed_forward_length`]: u32(cfg.intermediateSize),
    [`${a}.rope.dimension_count`]: u32(cfg.headDim),
    [`${a}.attention.head_count`]: u32(cfg.numHeads),
    [`${a}.attention.head_count_kv`]: u32(cfg.numKvHeads),
    [`${a}.attention.layer_norm_rms_epsilon`]: f32(cfg.rmsNormEps),
    [`${a}.rope.freq_base`]: f32(cfg.ropeTheta),
  };
  if (cfg.headDim !== cfg.hiddenSize / cfg.numHeads) meta[`${a}.attention.key_length`] = u32(cfg.headDim);
  const s = cfg.ropeScaling;
  if (s?.type === "linear") {
    meta[`${a}.rope.scaling.type`] = "linear";
    meta[`${a}.rope.scaling.factor`] = f32(s.factor);
  } else if (s?.type === "llama3") {
    meta[`${a}.rope.scaling.type`] = "llama3";
    meta[`${a}.rope.scaling.factor`] = f32(s.factor);
    meta[`${a}.rope.scaling.low_freq_factor`] = f32(s.lowFreqFactor);
    meta[`${a}.rope.scaling.high_freq_factor`] = f32(s.highFreqFactor);
    meta[`${a}.rope.scaling.original_context_length`] = u32(s.originalMaxPositionEmbeddings);
  }
  if (cfg.bosTokenId !== null) meta["tokenizer.ggml.bos_token_id"] = u32(cfg.bosTokenId);
  if (cfg.eosTokenIds.length > 0) meta["tokenizer.ggml.eos_token_id"] = u32(cfg.eosTokenIds[0]!);
  Object.assign(meta, opts.ggufMetadata);

  const weights = new Map<string, Float32Array>();
  const tensors: GGUFTensorEntry[] = [];
  for (const [name, values] of source) {
    const shape = expectedShape(cfg, name);
    let stored: Float32Array;
    let data: Uint8Array;
    let type: DType;
    if (shape.length === 1) {
      // Like llama.cpp: 1-D tensors stay F32, holding the value the dtype would store
      // so both formats of one seed carry identical numbers.
      stored = opts.dtype === "F16" || opts.dtype === "BF16" ? encodeFloat(values, opts.dtype).stored : values;
      data = new Uint8Array(stored.slice().buffer);
      type = DType.F32;
    } else if (opts.dtype === "Q8_0" || opts.dtype === "Q4_0") {
      ({ data, stored } = opts.dtype === "Q8_0" ? quantizeQ8_0(values) : quantizeQ4_0(values));
      type = GGUF_DTYPE[opts.dtype];
    } else {
      ({ data, stored } = encodeFloat(values, opts.dtype));
      type = GGUF_DTYPE[opts.dtype];
    }
    weights.set(name, stored);
    // llama-arch GGUFs hold q/k rows permuted for adjacent-pair RoPE (MODEL_CARD.md);
    // rows are independent (quant blocks run along `in`), so permuting bytes suffices.
    const heads = name.endsWith("q_proj.weight") ? cfg.numHeads : name.endsWith("k_proj.weight") ? cfg.numKvHeads : 0;
    if (cfg.arch === "llama" && heads > 0) data = permuteRowsForGGUF(data, heads, cfg.headDim);
    tensors.push({ name: ggufNameFromHF(name)!, dims: [...shape].reverse(), type, data });
  }
  if (cfg.ropeFreqFactors) {
    const factors = cfg.ropeFreqFactors;
    tensors.push({ name: "rope_freqs.weight", dims: [factors.length], type: DType.F32, data: new Uint8Array(factors.slice().buffer) });
  }
  writeFileSync(path, encodeGGUF(meta, tensors));
  return weights;
}

/** Within each head of `headDim` rows: GGUF row 2i = HF row i, row 2i+1 = HF row i + D/2. */
export function permuteRowsForGGUF(data: Uint8Array, heads: number, headDim: number): Uint8Array {
  const rowBytes = data.byteLength / (heads * headDim);
  const out = new Uint8Array(data.byteLength);
  const half = headDim / 2;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      const base = h * headDim;
      out.set(data.subarray((base + i) * rowBytes, (base + i + 1) * rowBytes), (base + 2 * i) * rowBytes);
      out.set(data.subarray((base + half + i) * rowBytes, (base + half + i + 1) * rowBytes), (base + 2 * i + 1) * rowBytes);
    }
  }
  return out;
}

/** A metadata value with an explicit GGUF type (plain values are typed by gvInfer). */
export interface TypedGGUFValue {
  ggufType: GGUFValueType;
  value: unknown;
  /** Element type, for ARRAY. */
  elemType?: GGUFValueType;
}
export type GGUFMetaValue =
  | TypedGGUFValue | string | boolean | number | string[] | number[]
  | Float32Array | Int32Array | Uint32Array | Uint8Array;

export function gv(ggufType: GGUFValueType, value: unknown, elemType?: GGUFValueType): TypedGGUFValue {
  return { ggufType, value, elemType };
}

export interface GGUFTensorEntry {
  name: string;
  /** GGML order (ne[0] first). */
  dims: number[];
  type: number;
  data: Uint8Array;
}

/** A GGUF file; `version`/`alignment` are overridable so tests can make bad files. */
export function encodeGGUF(
  metadata: Record<string, GGUFMetaValue>,
  tensors: GGUFTensorEntry[],
  { version = 3, alignment = 32 }: { version?: number; alignment?: number } = {},
): Uint8Array {
  const w = new ByteWriter();
  w.u32(0x46554747);
  w.u32(version);
  w.u64(tensors.length);
  const entries = Object.entries(metadata);
  w.u64(entries.length);
  for (const [key, raw] of entries) {
    w.string(key);
    const v = typeof raw === "object" && raw !== null && "ggufType" in raw ? raw : gvInfer(raw);
    w.u32(v.ggufType);
    w.value(v);
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    w.string(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(t.type);
    w.u64(offset);
    offsets.push(offset);
    offset = Math.ceil((offset + t.data.byteLength) / alignment) * alignment;
  }
  w.pad(alignment);
  const dataStart = w.length;
  const out = w.finish(dataStart + offset);
  tensors.forEach((t, i) => out.set(t.data, dataStart + offsets[i]!));
  return out;
}

function gvInfer(v: GGUFMetaValue): TypedGGUFValue {
  if (typeof v === "string") return gv(GGUFValueType.STRING, v);
  if (typeof v === "boolean") return gv(GGUFValueType.BOOL, v);
  if (typeof v === "number") return gv(Number.isInteger(v) ? GGUFValueType.INT32 : GGUFValueType.FLOAT32, v);
  if (v instanceof Float32Array) return gv(GGUFValueType.ARRAY, v, GGUFValueType.FLOAT32);
  if (v instanceof Int32Array) return gv(GGUFValueType.ARRAY, v, GGUFValueType.INT32);
  if (v instanceof Uint32Array) return gv(GGUFValueType.ARRAY, v, GGUFValueType.UINT32);
  if (v instanceof Uint8Array) return gv(GGUFValueType.ARRAY, v, GGUFValueType.UINT8);
  if (Array.isArray(v)) {
    const elem = v.every((x) => typeof x === "string") ? GGUFValueType.STRING : GGUFValueType.INT32;
    return gv(GGUFValueType.ARRAY, v, elem);
  }
  return v as TypedGGUFValue;
}

class ByteWriter {
  private buf = new Uint8Array(1024);
  private view = new DataView(this.buf.buffer);
  length = 0;

  private grow(n: number): number {
    if (this.length + n > this.buf.byteLength) {
      const bigger = new Uint8Array(Math.max(this.buf.byteLength * 2, this.length + n));
      bigger.set(this.buf);
      this.buf = bigger;
      this.view = new DataView(bigger.buffer);
    }
    const at = this.length;
    this.length += n;
    return at;
  }

  // grow() may swap the buffer, so it runs before this.buf/this.view are read.
  u8(v: number) { const at = this.grow(1); this.view.setUint8(at, v); }
  u32(v: number) { const at = this.grow(4); this.view.setUint32(at, v, true); }
  u64(v: number) { const at = this.grow(8); this.view.setBigUint64(at, BigInt(v), true); }
  bytes(b: Uint8Array) { const at = this.grow(b.byteLength); this.buf.set(b, at); }

  string(s: string) {
    const b = new TextEncoder().encode(s);
    this.u64(b.byteLength);
    this.bytes(b);
  }

  pad(alignment: number) {
    this.grow((alignment - (this.length % alignment)) % alignment);
  }

  scalar(type: GGUFValueType, v: unknown) {
    if (type === GGUFValueType.STRING) return this.string(String(v));
    const n = v as number;
    const size = { 0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8 }[type as number];
    if (size === undefined) throw new Error(`cannot write GGUF value type ${type} as a scalar`);
    const at = this.grow(size);
    const view = this.view;
    switch (type) {
      case GGUFValueType.UINT8: return view.setUint8(at, n);
      case GGUFValueType.INT8: return view.setInt8(at, n);
      case GGUFValueType.BOOL: return view.setUint8(at, v ? 1 : 0);
      case GGUFValueType.UINT16: return view.setUint16(at, n, true);
      case GGUFValueType.INT16: return view.setInt16(at, n, true);
      case GGUFValueType.UINT32: return view.setUint32(at, n, true);
      case GGUFValueType.INT32: return view.setInt32(at, n, true);
      case GGUFValueType.FLOAT32: return view.setFloat32(at, n, true);
      case GGUFValueType.UINT64: return view.setBigUint64(at, BigInt(n), true);
      case GGUFValueType.INT64: return view.setBigInt64(at, BigInt(n), true);
      case GGUFValueType.FLOAT64: return view.setFloat64(at, n, true);
    }
  }

  value(v: TypedGGUFValue) {
    if (v.ggufType !== GGUFValueType.ARRAY) return this.scalar(v.ggufType, v.value);
    const items = Array.from(v.value as ArrayLike<unknown>);
    this.u32(v.elemType!);
    this.u64(items.length);
    for (const item of items) this.scalar(v.elemType!, item);
  }

  finish(totalLength: number): Uint8Array {
    const out = new Uint8Array(totalLength);
    out.set(this.buf.subarray(0, this.length));
    return out;
  }
}

// ---- number formats (GGML's rules) ------------------------------------------

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** f32 -> IEEE half bits, round to nearest even (as F16C and ggml's fp32_to_fp16). */
export function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0]!;
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 112; // rebias 127 -> 15
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let h = mant >>> shift;
    if (rest > half || (rest === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  // A carry out of the mantissa bumps the exponent, up to infinity: both correct.
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h++;
  return sign | h;
}

export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** f32 -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN). */
export function f32ToBF16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0]!;
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16BitsToF32(h: number): number {
  u32Scratch[0] = h << 16;
  return f32Scratch[0]!;
}

/** Encodes as F32/F16/BF16 bytes; `stored` is what decoding them gives back. */
export function encodeFloat(values: Float32Array, dtype: "F32" | "F16" | "BF16"): { data: Uint8Array; stored: Float32Array } {
  if (dtype === "F32") return { data: new Uint8Array(values.slice().buffer), stored: values.slice() };
  const bits = new Uint16Array(values.length);
  const stored = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = values[i]!;
    bits[i] = dtype === "F16" ? f32ToF16Bits(x) : f32ToBF16Bits(x);
    stored[i] = dtype === "F16" ? f16BitsToF32(bits[i]!) : bf16BitsToF32(bits[i]!);
  }
  return { data: new Uint8Array(bits.buffer), stored };
}

/** C's roundf: halves away from zero. */
function roundHalfAway(x: number): number {
  return Math.sign(x) * Math.floor(Math.abs(x) + 0.5);
}

const fr = Math.fround;

/** ggml quantize_row_q8_0_ref: d = amax/127, q = roundf(x * (1/d)); x' = q * f16(d). */
export function quantizeQ8_0(values: Float32Array): { data: Uint8Array; stored: Float32Array } {
  const blocks = values.length / 32;
  const data = new Uint8Array(blocks * 34);
  const view = new DataView(data.buffer);
  const stored = new Float32Array(values.length);
  for (let b = 0; b < blocks; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(values[b * 32 + j]!));
    const d = fr(amax / 127);
    const id = d ? fr(1 / d) : 0;
    const dBits = f32ToF16Bits(d);
    const dStored = f16BitsToF32(dBits);
    view.setUint16(b * 34, dBits, true);
    for (let j = 0; j < 32; j++) {
      const q = roundHalfAway(fr(values[b * 32 + j]! * id));
      view.setInt8(b * 34 + 2 + j, q);
      stored[b * 32 + j] = fr(q * dStored);
    }
  }
  return { data, stored };
}

/** ggml quantize_row_q4_0_ref: d = (signed value of largest magnitude) / -8,
 *  q = min(15, trunc(x * (1/d) + 8.5)); byte j = q[j] | q[j + 16] << 4; x' = (q - 8) * f16(d). */
export function quantizeQ4_0(values: Float32Array): { data: Uint8Array; stored: Float32Array } {
  const blocks = values.length / 32;
  const data = new Uint8Array(blocks * 18);
  const view = new DataView(data.buffer);
  const stored = new Float32Array(values.length);
  for (let b = 0; b < blocks; b++) {
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = values[b * 32 + j]!;
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = fr(max / -8);
    const id = d ? fr(1 / d) : 0;
    const dBits = f32ToF16Bits(d);
    const dStored = f16BitsToF32(dBits);
    view.setUint16(b * 18, dBits, true);
    const q = (j: number) => Math.min(15, Math.trunc(fr(fr(values[b * 32 + j]! * id) + 8.5)));
    for (let j = 0; j < 16; j++) {
      const lo = q(j);
      const hi = q(j + 16);
      data[b * 18 + 2 + j] = lo | (hi << 4);
      stored[b * 32 + j] = fr((lo - 8) * dStored);
      stored[b * 32 + j + 16] = fr((hi - 8) * dStored);
    }
  }
  return { data, stored };
}

// ---- deterministic random numbers --------------------------------------------

/** mulberry32 uniforms + Box-Muller normals: small, fast, same stream on every machine. */
class Rng {
  private state: number;
  private spare: number | null = null;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  uniform(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  normal(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    const u = 1 - this.uniform(); // (0, 1]: log stays finite
    const v = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }
}

// ---- reading back (for tests and reference forwards) -----------------------------

/** Decodes `count` elements of `dtype` from `bytes` per the ffi/specinfer.h layouts. */
export function dequantize(dtype: DType, bytes: Uint8Array, count: number): Float32Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(count);
  switch (dtype) {
    case DType.F32:
      for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
      break;
    case DType.F16:
      for (let i = 0; i < count; i++) out[i] = f16BitsToF32(view.getUint16(2 * i, true));
      break;
    case DType.BF16:
      for (let i = 0; i < count; i++) out[i] = bf16BitsToF32(view.getUint16(2 * i, true));
      break;
    case DType.Q8_0:
      for (let i = 0; i < count; i++) {
        const block = Math.floor(i / 32) * 34;
        out[i] = view.getInt8(block + 2 + (i % 32)) * f16BitsToF32(view.getUint16(block, true));
      }
      break;
    case DType.Q4_0:
      for (let i = 0; i < count; i++) {
        const block = Math.floor(i / 32) * 18;
        const j = i % 32;
        const byte = bytes[block + 2 + (j % 16)]!;
        const q = j < 16 ? byte & 15 : byte >> 4;
        out[i] = (q - 8) * f16BitsToF32(view.getUint16(block, true));
      }
      break;
  }
  return out;
}

/** Inverse of permuteRowsForGGUF on float rows of length `rowLen`. */
export function unpermuteRowsFromGGUF(values: Float32Array, heads: number, headDim: number): Float32Array {
  const rowLen = values.length / (heads * headDim);
  const out = new Float32Array(values.length);
  const half = headDim / 2;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      const base = h * headDim;
      out.set(values.subarray((base + 2 * i) * rowLen, (base + 2 * i + 1) * rowLen), (base + i) * rowLen);
      out.set(values.subarray((base + 2 * i + 1) * rowLen, (base + 2 * i + 2) * rowLen), (base + half + i) * rowLen);
    }
  }
  return out;
}

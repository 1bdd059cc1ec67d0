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
// Also here: a streaming GGUF / safetensors writer (F32, F16, Q8_0) that never holds
// more than one tensor in memory, so multi-GB models can be written on a small machine.

import { closeSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { DType, type MappedFile } from "../backend/backend.ts";
import { expectedTensors, ggufNameFromHF } from "./arch.ts";
import type { ModelConfig } from "./config.ts";
import { GGUFValueType } from "./gguf.ts";
import { loadModelFiles, type LoadedModel } from "./load.ts";

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

export interface NamedTensor {
  /** HF name. */
  name: string;
  /** HF shape ([out, in] for matrices). */
  shape: number[];
  values: Float32Array;
}

/** A model's float weights by HF name, read lazily from its files (HF layout). */
export interface FloatWeights {
  config: ModelConfig;
  get(name: string): Float32Array;
  close(): void;
}

export function widenedConfig(c: ModelConfig, spec: WidenSpec): ModelConfig {
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

/** Float weights of an HF directory or GGUF file (F32 / F16 / BF16 / Q8_0), HF layout:
 *  the q/k rows of a llama-arch GGUF are un-permuted back to rotate_half order. */
export function readFloatWeights(path: string): FloatWeights {
  const files: LoadedModel = loadModelFiles(path, readMapped);
  const c = files.config;
  return {
    config: c,
    get(name: string): Float32Array {
      const t = files.tensors.get(name);
      if (!t) throw new Error(`${path}: missing tensor ${name}`);
      const count = t.shape.reduce((a, b) => a * b, 1);
      let values = decode(t.dtype, t.file.bytes.subarray(t.offset, t.offset + t.bytes), count, `${path}: ${name}`);
      const heads = name.endsWith("q_proj.weight") ? c.numHeads : name.endsWith("k_proj.weight") ? c.numKvHeads : 0;
      if (files.format === "gguf" && c.arch !== "qwen2" && heads > 0) values = permuteRows(values, heads, c.headDim, true);
      return values;
    },
    close: () => files.close(),
  };
}

function decode(dtype: DType, bytes: Uint8Array, count: number, what: string): Float32Array {
  const aligned = bytes.slice();
  switch (dtype) {
    case DType.F32:
      return new Float32Array(aligned.buffer, 0, count);
    case DType.F16:
      return Float32Array.from(new Float16Array(aligned.buffer, 0, count));
    case DType.BF16: {
      const h = new Uint16Array(aligned.buffer, 0, count);
      const bits = new Uint32Array(count);
      for (let i = 0; i < count; i++) bits[i] = h[i]! << 16;
      return new Float32Array(bits.buffer);
    }
    case DType.Q8_0: {
      const out = new Float32Array(count);
      const view = new DataView(aligned.buffer);
      const d = new Float16Array(1);
      const dBits = new Uint16Array(d.buffer);
      for (let b = 0; b < count / 32; b++) {
        dBits[0] = view.getUint16(b * 34, true);
        const scale = d[0]!;
        for (let j = 0; j < 32; j++) out[b * 32 + j] = view.getInt8(b * 34 + 2 + j) * scale;
      }
      return out;
    }
    default:
      throw new Error(`${what}: widening reads F32, F16, BF16 and Q8_0 weights, not dtype ${dtype}`);
  }
}

/** GGUF llama q/k row order: within each head of D rows, row 2i = HF row i, row 2i+1 =
 *  HF row i + D/2 (the converters' permutation). `inverse` maps back. */
function permuteRows(values: Float32Array, heads: number, headDim: number, inverse = false): Float32Array {
  const rowLen = values.length / (heads * headDim);
  const out = new Float32Array(values.length);
  const half = headDim / 2;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      for (const [hfRow, ggufRow] of [[i, 2 * i], [half + i, 2 * i + 1]]) {
        const [from, to] = inverse ? [ggufRow, hfRow] : [hfRow, ggufRow];
        out.set(values.subarray((h * headDim + from!) * rowLen, (h * headDim + from! + 1) * rowLen), (h * headDim + to!) * rowLen);
      }
    }
  }
  return out;
}

// ---- encoding -------------------------------------------------------------------

export type WriteDType = "F32" | "F16" | "Q8_0";

const GGML_TYPE: Record<WriteDType, DType> = { F32: DType.F32, F16: DType.F16, Q8_0: DType.Q8_0 };
const GGUF_FILE_TYPE: Record<WriteDType, number> = { F32: 0, F16: 1, Q8_0: 7 };

export function encodedBytes(dtype: WriteDType, count: number): number {
  return dtype === "F32" ? 4 * count : dtype === "F16" ? 2 * count : (count / 32) * 34;
}

export function encodeF16(values: Float32Array): Uint8Array {
  return new Uint8Array(new Float16Array(values).buffer);
}

/** ggml's Q8_0: per 32 values, d = amax/127 (stored f16), q = round(x / d). */
export function encodeQ8_0(values: Float32Array): Uint8Array {
  if (values.length % 32 !== 0) throw new Error(`Q8_0 needs a multiple of 32 values, got ${values.length}`);
  const blocks = values.length / 32;
  const out = new Uint8Array(blocks * 34);
  const q = new Int8Array(out.buffer);
  const half = new Float16Array(1);
  const halfBits = new Uint16Array(half.buffer);
  for (let b = 0; b < blocks; b++) {
    const base = b * 32;
    let amax = 0;
    for (let j = 0; j < 32; j++) {
      const a = Math.abs(values[base + j]!);
      if (a > amax) amax = a;
    }
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    half[0] = d;
    out[b * 34] = halfBits[0]! & 0xff;
    out[b * 34 + 1] = halfBits[0]! >> 8;
    for (let j = 0; j < 32; j++) {
      const x = Math.fround(values[base + j]! * id);
      q[b * 34 + 2 + j] = x < 0 ? -Math.floor(-x + 0.5) : Math.floor(x + 0.5);
    }
  }
  return out;
}

function encode(dtype: WriteDType, values: Float32Array): Uint8Array {
  if (dtype === "F32") return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  return dtype === "F16" ? encodeF16(values) : encodeQ8_0(values);
}

// ---- GGUF writer ------------------------------------------------------------------

/** A metadata value with its GGUF type (arrays: `elem` is the element type). */
export interface GGUFValue {
  type: GGUFValueType;
  value: unknown;
  elem?: GGUFValueType;
}

export const gguf = {
  u32: (v: number): GGUFValue => ({ type: GGUFValueType.UINT32, value: v }),
  i32: (v: number): GGUFValue => ({ type: GGUFValueType.INT32, value: v }),
  f32: (v: number): GGUFValue => ({ type: GGUFValueType.FLOAT32, value: v }),
  bool: (v: boolean): GGUFValue => ({ type: GGUFValueType.BOOL, value: v }),
  str: (v: string): GGUFValue => ({ type: GGUFValueType.STRING, value: v }),
  strings: (v: string[]): GGUFValue => ({ type: GGUFValueType.ARRAY, value: v, elem: GGUFValueType.STRING }),
  f32s: (v: ArrayLike<number>): GGUFValue => ({ type: GGUFValueType.ARRAY, value: v, elem: GGUFValueType.FLOAT32 }),
  i32s: (v: ArrayLike<number>): GGUFValue => ({ type: GGUFValueType.ARRAY, value: v, elem: GGUFValueType.INT32 }),
};

const SCALAR_SIZE: Partial<Record<GGUFValueType, number>> = {
  [GGUFValueType.UINT8]: 1, [GGUFValueType.INT8]: 1, [GGUFValueType.BOOL]: 1,
  [GGUFValueType.UINT16]: 2, [GGUFValueType.INT16]: 2,
  [GGUFValueType.UINT32]: 4, [GGUFValueType.INT32]: 4, [GGUFValueType.FLOAT32]: 4,
  [GGUFValueType.UINT64]: 8, [GGUFValueType.INT64]: 8, [GGUFValueType.FLOAT64]: 8,
};

class Bytes {
  private buf = new Uint8Array(1 << 16);
  private view = new DataView(this.buf.buffer);
  length = 0;

  private at(n: number): number {
    if (this.length + n > this.buf.byteLength) {
      const bigger = new Uint8Array(Math.max(2 * this.buf.byteLength, this.length + n));
      bigger.set(this.buf);
      this.buf = bigger;
      this.view = new DataView(bigger.buffer);
    }
    const at = this.length;
    this.length += n;
    return at;
  }

  // at() may swap the buffer, so it runs before this.buf / this.view are read.
  u32(v: number) { const at = this.at(4); this.view.setUint32(at, v, true); }
  u64(v: number) { const at = this.at(8); this.view.setBigUint64(at, BigInt(v), true); }
  string(s: string) {
    const b = new TextEncoder().encode(s);
    this.u64(b.byteLength);
    const at = this.at(b.byteLength);
    this.buf.set(b, at);
  }
  scalar(type: GGUFValueType, v: unknown) {
    if (type === GGUFValueType.STRING) return this.string(String(v));
    const size = SCALAR_SIZE[type];
    if (size === undefined) throw new Error(`GGUF writer: value type ${type} is not a scalar`);
    const at = this.at(size);
    const view = this.view;
    switch (type) {
      case GGUFValueType.BOOL: return view.setUint8(at, v ? 1 : 0);
      case GGUFValueType.UINT8: return view.setUint8(at, v as number);
      case GGUFValueType.INT8: return view.setInt8(at, v as number);
      case GGUFValueType.UINT16: return view.setUint16(at, v as number, true);
      case GGUFValueType.INT16: return view.setInt16(at, v as number, true);
      case GGUFValueType.UINT32: return view.setUint32(at, v as number, true);
      case GGUFValueType.INT32: return view.setInt32(at, v as number, true);
      case GGUFValueType.FLOAT32: return view.setFloat32(at, v as number, true);
      case GGUFValueType.UINT64: return view.setBigUint64(at, BigInt(v as number), true);
      case GGUFValueType.INT64: return view.setBigInt64(at, BigInt(v as number), true);
      case GGUFValueType.FLOAT64: return view.setFloat64(at, v as number, true);
    }
  }
  value(v: GGUFValue) {
    this.u32(v.type);
    if (v.type !== GGUFValueType.ARRAY) return this.scalar(v.type, v.value);
    const items = v.value as ArrayLike<unknown>;
    this.u32(v.elem!);
    this.u64(items.length);
    for (let i = 0; i < items.length; i++) this.scalar(v.elem!, items[i]);
  }
  pad(alignment: number) { this.at((alignment - (this.length % alignment)) % alignment); }
  get bytes(): Uint8Array { return this.buf.subarray(0, this.length); }
}

const ALIGNMENT = 32;

/** GGUF metadata describing `c` (llama.cpp's keys), without a tokenizer. */
export function ggufModelMetadata(c: ModelConfig, dtype: WriteDType, name: string): Record<string, GGUFValue> {
  const a = c.arch === "qwen2" ? "qwen2" : "llama";
  const meta: Record<string, GGUFValue> = {
    "general.architecture": gguf.str(a),
    "general.name": gguf.str(name),
    "general.file_type": gguf.u32(GGUF_FILE_TYPE[dtype]),
    "general.alignment": gguf.u32(ALIGNMENT),
    [`${a}.vocab_size`]: gguf.u32(c.vocabSize),
    [`${a}.context_length`]: gguf.u32(c.maxPositionEmbeddings),
    [`${a}.embedding_length`]: gguf.u32(c.hiddenSize),
    [`${a}.block_count`]: gguf.u32(c.numLayers),
    [`${a}.feed_forward_length`]: gguf.u32(c.intermediateSize),
    [`${a}.rope.dimension_count`]: gguf.u32(c.headDim),
    [`${a}.attention.head_count`]: gguf.u32(c.numHeads),
    [`${a}.attention.head_count_kv`]: gguf.u32(c.numKvHeads),
    [`${a}.attention.layer_norm_rms_epsilon`]: gguf.f32(c.rmsNormEps),
    [`${a}.rope.freq_base`]: gguf.f32(c.ropeTheta),
  };
  if (c.headDim * c.numHeads !== c.hiddenSize) {
    meta[`${a}.attention.key_length`] = gguf.u32(c.headDim);
    meta[`${a}.attention.value_length`] = gguf.u32(c.headDim);
  }
  const s = c.ropeScaling;
  if (s?.type === "linear") {
    meta[`${a}.rope.scaling.type`] = gguf.str("linear");
    meta[`${a}.rope.scaling.factor`] = gguf.f32(s.factor);
  } else if (s?.type === "llama3") {
    meta[`${a}.rope.scaling.type`] = gguf.str("llama3");
    meta[`${a}.rope.scaling.factor`] = gguf.f32(s.factor);
    meta[`${a}.rope.scaling.low_freq_factor`] = gguf.f32(s.lowFreqFactor);
    meta[`${a}.rope.scaling.high_freq_factor`] = gguf.f32(s.highFreqFactor);
    meta[`${a}.rope.scaling.original_context_length`] = gguf.u32(s.originalMaxPositionEmbeddings);
  }
  if (c.bosTokenId !== null) meta["tokenizer.ggml.bos_token_id"] = gguf.u32(c.bosTokenId);
  if (c.eosTokenIds.length > 0) meta["tokenizer.ggml.eos_token_id"] = gguf.u32(c.eosTokenIds[0]!);
  return meta;
}

/** The tokenizer.* keys of a GGUF file, re-typed for writing (ids as u32, flags as bool,
 *  typed arrays by their element type). */
export function ggufTokenizerMetadata(metadata: Map<string, unknown>): Record<string, GGUFValue> {
  const out: Record<string, GGUFValue> = {};
  for (const [key, v] of metadata) {
    if (!key.startsWith("tokenizer.")) continue;
    if (typeof v === "string") out[key] = gguf.str(v);
    else if (typeof v === "boolean") out[key] = gguf.bool(v);
    else if (typeof v === "number") out[key] = Number.isInteger(v) ? gguf.u32(v) : gguf.f32(v);
    else if (v instanceof Float32Array) out[key] = gguf.f32s(v);
    else if (v instanceof Int32Array) out[key] = gguf.i32s(v);
    else if (v instanceof Uint32Array) out[key] = { type: GGUFValueType.ARRAY, value: v, elem: GGUFValueType.UINT32 };
    else if (Array.isArray(v) && v.every((x) => typeof x === "string")) out[key] = gguf.strings(v);
    else throw new Error(`GGUF writer: cannot copy metadata ${key}`);
  }
  return out;
}

/**
 * Writes a GGUF v3 model from tensors produced one at a time (HF names and layout, in
 * expectedTensors(config) order). Matrices are stored as `dtype`, 1-D tensors as F32 (as
 * llama.cpp does); q/k rows are permuted for llama-arch RoPE. Peak memory: one tensor.
 */
export function writeGGUF(
  path: string, config: ModelConfig, tensors: Iterable<NamedTensor>, dtype: WriteDType, metadata: Record<string, GGUFValue>,
): void {
  const expected = expectedTensors(config);
  const typeOf = (shape: number[]): WriteDType => (shape.length === 1 ? "F32" : dtype);
  const h = new Bytes();
  h.u32(0x46554747);
  h.u32(3);
  h.u64(expected.length);
  const entries = Object.entries(metadata);
  h.u64(entries.length);
  for (const [key, v] of entries) {
    h.string(key);
    h.value(v);
  }
  let offset = 0;
  for (const t of expected) {
    if (dtype === "Q8_0" && t.shape.length === 2 && t.shape[1]! % 32 !== 0) {
      throw new Error(`${t.name}: Q8_0 needs rows of a multiple of 32 values, got ${t.shape[1]}`);
    }
    h.string(ggufNameFromHF(t.name)!);
    h.u32(t.shape.length);
    for (const d of [...t.shape].reverse()) h.u64(d);
    h.u32(GGML_TYPE[typeOf(t.shape)]);
    h.u64(offset);
    offset += encodedBytes(typeOf(t.shape), t.shape.reduce((a, b) => a * b, 1));
    offset = Math.ceil(offset / ALIGNMENT) * ALIGNMENT;
  }
  h.pad(ALIGNMENT);

  const fd = openSync(path, "w");
  try {
    writeSync(fd, h.bytes);
    const pad = new Uint8Array(ALIGNMENT);
    let i = 0;
    for (const t of tensors) {
      const want = expected[i++];
      if (!want || want.name !== t.name) throw new Error(`GGUF writer: got tensor ${t.name}, expected ${want?.name ?? "no more"}`);
      let values = t.values;
      const heads = t.name.endsWith("q_proj.weight") ? config.numHeads : t.name.endsWith("k_proj.weight") ? config.numKvHeads : 0;
      if (config.arch !== "qwen2" && heads > 0) values = permuteRows(values, heads, config.headDim);
      const data = encode(typeOf(t.shape), values);
      writeSync(fd, data);
      const rest = (ALIGNMENT - (data.byteLength % ALIGNMENT)) % ALIGNMENT;
      if (rest) writeSync(fd, pad, 0, rest);
    }
    if (i !== expected.length) throw new Error(`GGUF writer: got ${i} tensors, expected ${expected.length}`);
  } finally {
    closeSync(fd);
  }
}

/** Writes an HF directory (config.json + model.safetensors, F32 or F16). Holds the
 *  whole model in memory: meant for small models. */
export function writeSafetensors(dir: string, config: ModelConfig, tensors: Iterable<NamedTensor>, dtype: "F32" | "F16"): void {
  mkdirSync(dir, { recursive: true });
  const parts: { name: string; shape: number[]; data: Uint8Array }[] = [];
  for (const t of tensors) parts.push({ name: t.name, shape: t.shape, data: encode(dtype, t.values).slice() });
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const p of parts) {
    header[p.name] = { dtype, shape: p.shape, data_offsets: [offset, offset + p.data.byteLength] };
    offset += p.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const fd = openSync(join(dir, "model.safetensors"), "w");
  try {
    const len = new Uint8Array(8);
    new DataView(len.buffer).setBigUint64(0, BigInt(headerBytes.byteLength), true);
    writeSync(fd, len);
    writeSync(fd, headerBytes);
    for (const p of parts) writeSync(fd, p.data);
  } finally {
    closeSync(fd);
  }
  writeFileSync(join(dir, "config.json"), JSON.stringify(hfConfig(config, dtype), null, 2));
}

function hfConfig(c: ModelConfig, dtype: "F32" | "F16") {
  const s = c.ropeScaling;
  return {
    architectures: [c.arch === "qwen2" ? "Qwen2ForCausalLM" : c.arch === "mistral" ? "MistralForCausalLM" : "LlamaForCausalLM"],
    model_type: c.arch,
    hidden_act: "silu",
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    head_dim: c.headDim,
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    rope_scaling: s === null ? null : s.type === "linear" ? { type: "linear", factor: s.factor } : {
      rope_type: "llama3", factor: s.factor, low_freq_factor: s.lowFreqFactor, high_freq_factor: s.highFreqFactor,
      original_max_position_embeddings: s.originalMaxPositionEmbeddings,
    },
    max_position_embeddings: c.maxPositionEmbeddings,
    tie_word_embeddings: c.tieWordEmbeddings,
    attention_bias: c.attentionBias,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds[0] ?? null,
    torch_dtype: dtype === "F32" ? "float32" : "float16",
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
      if (opts.dtype === "Q8_0") throw new Error("safetensors cannot hold Q8_0; write a .gguf");
      writeSafetensors(dst, config, tensors, opts.dtype);
    }
    return config;
  } finally {
    weights.close();
  }
}

// Model file writers: GGUF v3 (a whole model streamed to a file one tensor at a time, so
// multi-GB models fit a small machine, or hand-made files built in memory, which tests
// use) and HF directories (config.json + safetensors). Both GGUF paths share one header
// serializer; all tensor bytes come from encoding.ts.

import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { DType, dtypeBytes } from "../backend/backend.ts";
import { expectedTensors, familyOf, ggufNameFromHF } from "./registry.ts";
import type { ModelConfig } from "./config.ts";
import { encodeTensor, GGML_TYPE, permuteRowsForGGUF, QUANT_BLOCK, type WriteDType } from "./encoding.ts";
import { GGUFValueType, SCALAR_BYTES } from "./gguf.ts";

export interface NamedTensor {
  /** HF name. */
  name: string;
  /** HF shape ([out, in] for matrices). */
  shape: number[];
  values: Float32Array;
}

// ---- GGUF metadata values ---------------------------------------------------------

/** A metadata value with its GGUF type (arrays: `elem` is the element type). */
export interface GGUFValue {
  type: GGUFValueType;
  value: unknown;
  elem?: GGUFValueType;
}

/** What the GGUF writers take as metadata: typed values, or plain ones that
 *  ggufValueOf types. */
export type GGUFMetadata = Record<string, GGUFValue | PlainGGUFValue>;
type PlainGGUFValue = string | boolean | number | string[] | Float32Array | Int32Array | Uint32Array | Uint8Array;

/** Any value of any type, including ones a reader must refuse (tests build bad files). */
export function ggufValue(type: GGUFValueType, value: unknown, elem?: GGUFValueType): GGUFValue {
  return { type, value, elem };
}

export const gguf = {
  u32: (v: number) => ggufValue(GGUFValueType.UINT32, v),
  i32: (v: number) => ggufValue(GGUFValueType.INT32, v),
  f32: (v: number) => ggufValue(GGUFValueType.FLOAT32, v),
  bool: (v: boolean) => ggufValue(GGUFValueType.BOOL, v),
  str: (v: string) => ggufValue(GGUFValueType.STRING, v),
  strings: (v: string[]) => ggufValue(GGUFValueType.ARRAY, v, GGUFValueType.STRING),
  f32s: (v: ArrayLike<number>) => ggufValue(GGUFValueType.ARRAY, v, GGUFValueType.FLOAT32),
  i32s: (v: ArrayLike<number>) => ggufValue(GGUFValueType.ARRAY, v, GGUFValueType.INT32),
  u32s: (v: ArrayLike<number>) => ggufValue(GGUFValueType.ARRAY, v, GGUFValueType.UINT32),
  u8s: (v: ArrayLike<number>) => ggufValue(GGUFValueType.ARRAY, v, GGUFValueType.UINT8),
};

/** The GGUF type of a plain value as the reader returns it: integers as u32 (llama.cpp's
 *  type for token ids and counts; i32 when negative), other numbers as f32, typed arrays
 *  by their element type. */
function ggufValueOf(key: string, v: unknown): GGUFValue {
  if (typeof v === "string") return gguf.str(v);
  if (typeof v === "boolean") return gguf.bool(v);
  if (typeof v === "number") return !Number.isInteger(v) ? gguf.f32(v) : v < 0 ? gguf.i32(v) : gguf.u32(v);
  if (v instanceof Float32Array) return gguf.f32s(v);
  if (v instanceof Int32Array) return gguf.i32s(v);
  if (v instanceof Uint32Array) return gguf.u32s(v);
  if (v instanceof Uint8Array) return gguf.u8s(v);
  if (Array.isArray(v) && v.every((x) => typeof x === "string")) return gguf.strings(v);
  throw new Error(`GGUF writer: cannot type metadata ${key}`);
}

const isTypedValue = (v: GGUFValue | PlainGGUFValue): v is GGUFValue =>
  typeof v === "object" && !Array.isArray(v) && !ArrayBuffer.isView(v);

const ALIGNMENT = 32;
const LLAMA_FILE_TYPE: Record<WriteDType, number> = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 7, BF16: 32 };

/** GGUF metadata describing `c` (llama.cpp's keys), without a tokenizer. */
export function ggufModelMetadata(c: ModelConfig, dtype: WriteDType, name: string): Record<string, GGUFValue> {
  const family = familyOf(c.arch);
  const a = family.ggufMetadata ? c.arch : c.arch === "qwen2" ? "qwen2" : "llama";
  const general: Record<string, GGUFValue> = {
    "general.architecture": gguf.str(a),
    "general.name": gguf.str(name),
    "general.file_type": gguf.u32(LLAMA_FILE_TYPE[dtype]),
    "general.alignment": gguf.u32(ALIGNMENT),
  };
  const meta = { ...general, ...(family.ggufMetadata ? family.ggufMetadata(c) : llamaMetadata(c, a)) };
  if (c.bosTokenId !== null) meta["tokenizer.ggml.bos_token_id"] = gguf.u32(c.bosTokenId);
  if (c.eosTokenIds.length > 0) meta["tokenizer.ggml.eos_token_id"] = gguf.u32(c.eosTokenIds[0]!);
  return meta;
}

/** The `llama.*` / `qwen2.*` keys llama.cpp reads. */
function llamaMetadata(c: ModelConfig, a: string): Record<string, GGUFValue> {
  const meta: Record<string, GGUFValue> = {
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
    // llama.cpp takes a missing value_length as hidden / heads, so both are written.
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
  return meta;
}

/** The tokenizer.* keys of a GGUF file's metadata (as readGGUF returns it), typed for writing. */
export function ggufTokenizerMetadata(metadata: Map<string, unknown>): Record<string, GGUFValue> {
  const out: Record<string, GGUFValue> = {};
  for (const [key, v] of metadata) if (key.startsWith("tokenizer.")) out[key] = ggufValueOf(key, v);
  return out;
}

// ---- GGUF files ---------------------------------------------------------------------

class ByteWriter {
  private buf = new Uint8Array(1 << 16);
  private view = new DataView(this.buf.buffer);
  length = 0;

  private grow(n: number): number {
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

  // grow() may swap the buffer, so it runs before this.buf / this.view are read.
  u32(v: number) { const at = this.grow(4); this.view.setUint32(at, v, true); }
  u64(v: number) { const at = this.grow(8); this.view.setBigUint64(at, BigInt(v), true); }
  string(s: string) {
    const b = new TextEncoder().encode(s);
    this.u64(b.byteLength);
    const at = this.grow(b.byteLength);
    this.buf.set(b, at);
  }
  scalar(type: GGUFValueType, v: unknown) {
    if (type === GGUFValueType.STRING) return this.string(String(v));
    const size = SCALAR_BYTES[type];
    if (size === undefined) throw new Error(`GGUF writer: value type ${type} is not a scalar`);
    const at = this.grow(size);
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
  pad(alignment: number) { this.grow((alignment - (this.length % alignment)) % alignment); }
  get bytes(): Uint8Array { return this.buf.subarray(0, this.length); }
}

interface TensorInfo {
  name: string;
  /** GGML order (ne[0] first). */
  dims: number[];
  type: number;
  bytes: number;
}

const alignUp = (n: number) => Math.ceil(n / ALIGNMENT) * ALIGNMENT;

/** Everything before the tensor data (padding included), and each tensor's data offset. */
function ggufHeader(metadata: GGUFMetadata, tensors: TensorInfo[], version: number): { header: Uint8Array; offsets: number[]; dataBytes: number } {
  const w = new ByteWriter();
  w.u32(0x46554747); // "GGUF"
  w.u32(version);
  w.u64(tensors.length);
  const entries = Object.entries(metadata);
  w.u64(entries.length);
  for (const [key, v] of entries) {
    w.string(key);
    w.value(isTypedValue(v) ? v : ggufValueOf(key, v));
  }
  const offsets: number[] = [];
  let offset = 0;
  for (const t of tensors) {
    w.string(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(t.type);
    w.u64(offset);
    offsets.push(offset);
    offset = alignUp(offset + t.bytes);
  }
  w.pad(ALIGNMENT);
  return { header: w.bytes, offsets, dataBytes: offset };
}

export interface GGUFTensorEntry {
  name: string;
  /** GGML order (ne[0] first). */
  dims: number[];
  type: number;
  data: Uint8Array;
}

/** A whole GGUF file in memory; `version` can be set to make files a reader must refuse. */
export function encodeGGUF(metadata: GGUFMetadata, tensors: GGUFTensorEntry[], { version = 3 }: { version?: number } = {}): Uint8Array {
  const { header, offsets, dataBytes } = ggufHeader(metadata, tensors.map((t) => ({ ...t, bytes: t.data.byteLength })), version);
  const out = new Uint8Array(header.byteLength + dataBytes);
  out.set(header);
  tensors.forEach((t, i) => out.set(t.data, header.byteLength + offsets[i]!));
  return out;
}

/**
 * Writes a GGUF model from tensors produced one at a time (HF names and layout, in
 * expectedTensors(config) order), then config.ropeFreqFactors as rope_freqs.weight if
 * set. Matrices are stored as `dtype`, 1-D tensors as F32 (as llama.cpp does); q/k rows
 * are permuted for llama-arch RoPE. Peak memory: one tensor.
 */
export function writeGGUF(path: string, config: ModelConfig, tensors: Iterable<NamedTensor>, dtype: WriteDType, metadata: GGUFMetadata): void {
  if (familyOf(config.arch).ggufArchs.length === 0) throw new Error(`GGUF writer: llama.cpp has no ${config.arch} architecture`);
  const expected = expectedTensors(config);
  const typeOf = (shape: number[]): WriteDType => (shape.length === 1 ? "F32" : dtype);
  const infos: TensorInfo[] = expected.map((t) => {
    if ((dtype === "Q8_0" || dtype === "Q4_0") && t.shape.length === 2 && t.shape[1]! % QUANT_BLOCK !== 0) {
      throw new Error(`${t.name}: ${dtype} needs rows of a multiple of ${QUANT_BLOCK} values, got ${t.shape[1]}`);
    }
    const type = GGML_TYPE[typeOf(t.shape)];
    return { name: ggufNameFromHF(t.name, config.arch)!, dims: [...t.shape].reverse(), type, bytes: dtypeBytes(type, t.shape.reduce((a, b) => a * b, 1)) };
  });
  const factors = config.ropeFreqFactors;
  if (factors) infos.push({ name: "rope_freqs.weight", dims: [factors.length], type: DType.F32, bytes: factors.byteLength });
  const { header } = ggufHeader(metadata, infos, 3);

  const fd = openSync(path, "w");
  const pad = new Uint8Array(ALIGNMENT);
  const writeAligned = (data: Uint8Array) => {
    writeSync(fd, data);
    const rest = alignUp(data.byteLength) - data.byteLength;
    if (rest) writeSync(fd, pad, 0, rest);
  };
  try {
    writeSync(fd, header);
    let i = 0;
    for (const t of tensors) {
      const want = expected[i++];
      if (!want || want.name !== t.name) throw new Error(`GGUF writer: got tensor ${t.name}, expected ${want?.name ?? "no more"}`);
      const values = familyOf(config.arch).ggufTensor?.(t.name, t.values, config) ?? t.values;
      const data = encodeTensor(typeOf(t.shape), values);
      const heads = t.name.endsWith("q_proj.weight") ? config.numHeads : t.name.endsWith("k_proj.weight") ? config.numKvHeads : 0;
      writeAligned(config.arch !== "qwen2" && heads > 0 ? permuteRowsForGGUF(data, heads, config.headDim) : data);
    }
    if (i !== expected.length) throw new Error(`GGUF writer: got ${i} tensors, expected ${expected.length}`);
    if (factors) writeAligned(encodeTensor("F32", factors));
  } finally {
    closeSync(fd);
  }
}

// ---- safetensors ----------------------------------------------------------------------

export interface SafetensorsEntry {
  name: string;
  /** Any safetensors dtype string (tests of unsupported dtypes pass e.g. "I64"). */
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** A safetensors file: header padded with spaces to 8 bytes, tensors back to back. */
export function encodeSafetensors(tensors: SafetensorsEntry[]): Uint8Array {
  const header: Record<string, unknown> = {};
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

/** Writes an HF directory: config.json and the tensors in `dtype`, in one
 *  model.safetensors or split into `shards` files with model.safetensors.index.json.
 *  Holds the whole model in memory: meant for small models. */
export function writeSafetensors(dir: string, config: ModelConfig, tensors: Iterable<NamedTensor>, dtype: WriteDType, shards = 1): void {
  if (dtype !== "F32" && dtype !== "F16" && dtype !== "BF16") throw new Error(`safetensors cannot hold ${dtype}; write a .gguf`);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "config.json"), JSON.stringify(hfConfig(config, dtype), null, 2));
  // Copies: an F32 encoding is a view of values the producer may reuse.
  const entries = [...tensors].map((t): SafetensorsEntry => ({ name: t.name, dtype, shape: t.shape, data: encodeTensor(dtype, t.values).slice() }));
  if (shards <= 1) {
    writeFileSync(join(dir, "model.safetensors"), encodeSafetensors(entries));
    return;
  }
  const weightMap: Record<string, string> = {};
  const perShard = Math.ceil(entries.length / shards);
  for (let s = 0; s < shards; s++) {
    const file = `model-${String(s + 1).padStart(5, "0")}-of-${String(shards).padStart(5, "0")}.safetensors`;
    const part = entries.slice(s * perShard, (s + 1) * perShard);
    for (const t of part) weightMap[t.name] = file;
    writeFileSync(join(dir, file), encodeSafetensors(part));
  }
  const totalSize = entries.reduce((a, t) => a + t.data.byteLength, 0);
  writeFileSync(
    join(dir, "model.safetensors.index.json"),
    JSON.stringify({ metadata: { total_size: totalSize }, weight_map: weightMap }, null, 2),
  );
}

const TORCH_DTYPE = { F32: "float32", F16: "float16", BF16: "bfloat16" };

function hfConfig(c: ModelConfig, dtype: keyof typeof TORCH_DTYPE) {
  const family = familyOf(c.arch);
  if (family.hfConfig) return { ...family.hfConfig(c), torch_dtype: TORCH_DTYPE[dtype] };
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
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds[0] ?? null,
    torch_dtype: TORCH_DTYPE[dtype],
  };
}

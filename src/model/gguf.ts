// GGUF (v2/v3) reader over a mapped file. Every read is bounds-checked so a truncated
// or hostile file yields a ModelFormatError naming the file, never a RangeError or a
// read past the mapping. Tensor data is not touched: tensors are (offset, bytes) refs.

import { DType, dtypeBytes, type MappedFile } from "../backend/backend.ts";
import { ModelFormatError, shown } from "./errors.ts";

const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
const DEFAULT_ALIGNMENT = 32;
const MAX_DIMS = 4; // GGML_MAX_DIMS
const MAX_ARRAY_NESTING = 8;

export enum GGUFValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

/** Bytes of one scalar value of each fixed-size type (strings/arrays are variable). */
export const SCALAR_BYTES: Partial<Record<GGUFValueType, number>> = {
  [GGUFValueType.UINT8]: 1,
  [GGUFValueType.INT8]: 1,
  [GGUFValueType.BOOL]: 1,
  [GGUFValueType.UINT16]: 2,
  [GGUFValueType.INT16]: 2,
  [GGUFValueType.UINT32]: 4,
  [GGUFValueType.INT32]: 4,
  [GGUFValueType.FLOAT32]: 4,
  [GGUFValueType.UINT64]: 8,
  [GGUFValueType.INT64]: 8,
  [GGUFValueType.FLOAT64]: 8,
};

/** GGML type names by id, so unsupported types are reported by name. */
const GGML_TYPE_NAMES: Record<number, string> = {
  0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
  10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
  16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
  22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
  29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
};

const SUPPORTED_TYPES = new Set<number>([DType.F32, DType.F16, DType.BF16, DType.Q8_0, DType.Q4_0]);

export function ggmlTypeName(type: number): string {
  return GGML_TYPE_NAMES[type] ?? "unknown";
}

export interface GGUFTensor {
  name: string;
  /** GGML order: dims[0] (ne[0]) is the contiguous, innermost dimension. */
  dims: number[];
  dtype: DType;
  /** Absolute byte offset of the tensor's data in the file. */
  offset: number;
  bytes: number;
}

export interface GGUFFile {
  version: number;
  /** Scalars as number/boolean/string (64-bit integers beyond 2^53 as bigint); arrays
   *  of numbers as typed arrays (u8/i8/u16/i16/u32/i32/f32/f64), others as JS arrays. */
  metadata: Map<string, unknown>;
  tensors: GGUFTensor[];
  /** Absolute byte offset of the (aligned) tensor data section. */
  dataOffset: number;
  alignment: number;
}

// ignoreBOM: a string that starts with U+FEFF keeps it (it can be a token's text).
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

class Reader {
  pos = 0;
  private readonly view: DataView;

  constructor(
    private readonly path: string,
    private readonly bytes: Uint8Array,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get size(): number {
    return this.bytes.byteLength;
  }

  get remaining(): number {
    return this.size - this.pos;
  }

  fail(detail: string): never {
    throw new ModelFormatError(this.path, detail);
  }

  /** Ensures `n` more bytes exist before reading `what`. */
  need(n: number, what: string): void {
    if (n > this.remaining) {
      this.fail(
        `truncated GGUF: ${what} needs ${n} bytes at offset ${this.pos}, but the file has ${this.size} bytes`,
      );
    }
  }

  u8(what: string): number {
    this.need(1, what);
    return this.view.getUint8(this.pos++);
  }

  u32(what: string): number {
    this.need(4, what);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }

  /** A u64 that must fit a JS number (counts, lengths, offsets, dims). */
  u64(what: string): number {
    this.need(8, what);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) this.fail(`${what} is absurdly large (${v})`);
    return Number(v);
  }

  string(what: string): string {
    const len = this.u64(`length of ${what}`);
    this.need(len, what);
    const raw = this.bytes.subarray(this.pos, this.pos + len);
    this.pos += len;
    try {
      return utf8.decode(raw);
    } catch {
      return this.fail(`${what} is not valid UTF-8`);
    }
  }

  scalar(type: GGUFValueType, what: string): unknown {
    const size = SCALAR_BYTES[type];
    if (size === undefined) {
      if (type === GGUFValueType.STRING) return this.string(what);
      return this.fail(`${what} has unknown value type ${type}`);
    }
    this.need(size, what);
    const at = this.pos;
    this.pos += size;
    const v = this.view;
    switch (type) {
      case GGUFValueType.UINT8: return v.getUint8(at);
      case GGUFValueType.INT8: return v.getInt8(at);
      case GGUFValueType.BOOL: return v.getUint8(at) !== 0;
      case GGUFValueType.UINT16: return v.getUint16(at, true);
      case GGUFValueType.INT16: return v.getInt16(at, true);
      case GGUFValueType.UINT32: return v.getUint32(at, true);
      case GGUFValueType.INT32: return v.getInt32(at, true);
      case GGUFValueType.FLOAT32: return v.getFloat32(at, true);
      case GGUFValueType.FLOAT64: return v.getFloat64(at, true);
      case GGUFValueType.UINT64: return narrow(v.getBigUint64(at, true));
      case GGUFValueType.INT64: return narrow(v.getBigInt64(at, true));
    }
    return this.fail(`${what} has unknown value type ${type}`);
  }

  value(type: number, what: string, depth = 0): unknown {
    if (type !== GGUFValueType.ARRAY) return this.scalar(type, what);
    if (depth >= MAX_ARRAY_NESTING) this.fail(`${what}: arrays nested too deeply`);
    const elemType = this.u32(`element type of ${what}`);
    const count = this.u64(`element count of ${what}`);
    // Every element takes at least one byte (strings and arrays at least 8 for their
    // length), so a count larger than what is left cannot be honest: refuse it before
    // allocating anything.
    const minElem = SCALAR_BYTES[elemType as GGUFValueType] ?? (elemType === GGUFValueType.STRING ? 8 : 12);
    if (count * minElem > this.remaining) {
      this.fail(
        `truncated GGUF: ${what} claims ${count} elements (at least ${count * minElem} bytes) ` +
          `but only ${this.remaining} bytes remain`,
      );
    }
    const typed = this.typedArray(elemType, count);
    if (typed) return typed;
    const out: unknown[] = new Array(count);
    for (let i = 0; i < count; i++) out[i] = this.value(elemType, `${what}[${i}]`, depth + 1);
    return out;
  }

  /** Numeric arrays come back as typed arrays (copied: the file gives no alignment). */
  private typedArray(elemType: number, count: number): ArrayBufferView | null {
    const ctor = TYPED_ARRAYS[elemType as GGUFValueType];
    if (!ctor) return null;
    const size = SCALAR_BYTES[elemType as GGUFValueType]!;
    const copy = Uint8Array.prototype.slice.call(this.bytes, this.pos, this.pos + count * size);
    this.pos += count * size;
    // Typed arrays use host byte order; GGUF is little-endian, as is every host we run on.
    return new ctor(copy.buffer, 0, count);
  }
}

type TypedArrayCtor = new (buffer: ArrayBuffer, byteOffset: number, length: number) => ArrayBufferView;

const TYPED_ARRAYS: Partial<Record<GGUFValueType, TypedArrayCtor>> = {
  [GGUFValueType.UINT8]: Uint8Array,
  [GGUFValueType.INT8]: Int8Array,
  [GGUFValueType.UINT16]: Uint16Array,
  [GGUFValueType.INT16]: Int16Array,
  [GGUFValueType.UINT32]: Uint32Array,
  [GGUFValueType.INT32]: Int32Array,
  [GGUFValueType.FLOAT32]: Float32Array,
  [GGUFValueType.FLOAT64]: Float64Array,
};

function narrow(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function blockSize(dtype: DType): number {
  return dtype === DType.Q8_0 || dtype === DType.Q4_0 ? 32 : 1;
}

export function readGGUF(file: MappedFile): GGUFFile {
  const r = new Reader(file.path, file.bytes);
  if (r.size === 0) r.fail("empty file (0 bytes), not a GGUF file");
  if (r.size < 4) r.fail(`file too short (${r.size} bytes) for a GGUF header`);
  const magic = r.u32("magic");
  if (magic !== GGUF_MAGIC) {
    const shown = Array.from(file.bytes.subarray(0, 4), (b) => b.toString(16).padStart(2, "0")).join(" ");
    r.fail(`bad magic (bytes ${shown}), expected "GGUF" (47 47 55 46)`);
  }
  const version = r.u32("version");
  if (version !== 2 && version !== 3) {
    // A big-endian file reads its version 2/3 byte-swapped.
    const bigEndian = version === 0x02000000 || version === 0x03000000;
    r.fail(
      bigEndian
        ? "unsupported GGUF version: big-endian GGUF files are not supported"
        : `unsupported GGUF version ${version} (supported: 2, 3)`,
    );
  }
  const tensorCount = r.u64("tensor count");
  const kvCount = r.u64("metadata count");
  // Smallest encodings: a KV is an 8-byte key length + 4-byte type + 1-byte value; a
  // tensor info is an 8-byte name length + 4-byte n_dims + 4-byte type + 8-byte offset.
  if (kvCount * 13 > r.remaining) r.fail(`absurd metadata count ${kvCount} for a ${r.size}-byte file`);
  if (tensorCount * 24 > r.remaining) r.fail(`absurd tensor count ${tensorCount} for a ${r.size}-byte file`);

  const metadata = new Map<string, unknown>();
  for (let i = 0; i < kvCount; i++) {
    const key = r.string(`metadata key #${i}`);
    const type = r.u32(`value type of metadata ${key}`);
    if (metadata.has(key)) r.fail(`duplicate metadata key ${key}`);
    metadata.set(key, r.value(type, `metadata ${key}`));
  }

  const alignment = readAlignment(r, metadata.get("general.alignment"));

  const infos: { name: string; dims: number[]; type: number; relOffset: number }[] = [];
  const names = new Set<string>();
  for (let i = 0; i < tensorCount; i++) {
    const name = r.string(`name of tensor #${i}`);
    const nDims = r.u32(`dimension count of tensor ${name}`);
    if (nDims < 1 || nDims > MAX_DIMS) r.fail(`tensor ${name} has ${nDims} dimensions (allowed 1..${MAX_DIMS})`);
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(r.u64(`dimension ${d} of tensor ${name}`));
    const type = r.u32(`type of tensor ${name}`);
    const relOffset = r.u64(`data offset of tensor ${name}`);
    if (names.has(name)) r.fail(`duplicate tensor ${name}`);
    names.add(name);
    infos.push({ name, dims, type, relOffset });
  }

  const dataOffset = Math.ceil(r.pos / alignment) * alignment;
  const tensors = infos.map(({ name, dims, type, relOffset }): GGUFTensor => {
    if (!SUPPORTED_TYPES.has(type)) {
      r.fail(`tensor ${name}: unsupported tensor type ${ggmlTypeName(type)} (${type})`);
    }
    const dtype = type as DType;
    const count = dims.reduce((a, b) => a * b, 1);
    if (!Number.isSafeInteger(count)) r.fail(`tensor ${name} has absurd dimensions [${dims.join(", ")}]`);
    const block = blockSize(dtype);
    if (dims[0]! % block !== 0) {
      r.fail(`tensor ${name}: ${ggmlTypeName(type)} row length ${dims[0]} is not a multiple of ${block}`);
    }
    if (relOffset % alignment !== 0) {
      r.fail(`tensor ${name}: data offset ${relOffset} is not a multiple of the alignment ${alignment}`);
    }
    const bytes = dtypeBytes(dtype, count);
    const offset = dataOffset + relOffset;
    if (offset + bytes > r.size) {
      r.fail(
        `truncated GGUF: tensor ${name} data [${offset}, ${offset + bytes}) ends past the end of the file ` +
          `(${r.size} bytes)`,
      );
    }
    return { name, dims, dtype, offset, bytes };
  });

  return { version, metadata, tensors, dataOffset, alignment };
}

function readAlignment(r: Reader, value: unknown): number {
  if (value === undefined) return DEFAULT_ALIGNMENT;
  if (typeof value !== "number" || !Number.isInteger(value) || value <= 0 || value > 1 << 20) {
    r.fail(`invalid general.alignment ${shown(value)}`);
  }
  return value;
}

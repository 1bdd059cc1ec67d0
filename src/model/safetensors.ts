// safetensors reader: u64 LE header length, JSON header {name: {dtype, shape,
// data_offsets}}, then the data section. Offsets are validated against the file so a
// truncated or inconsistent file is refused before any weight is read.

import { DType, type MappedFile } from "../backend/backend.ts";
import { ModelFormatError, shown } from "./errors.ts";

const DTYPES: Record<string, DType> = { F32: DType.F32, F16: DType.F16, BF16: DType.BF16 };
const ELEMENT_BYTES: Record<string, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1,
  BOOL: 1, F8_E4M3: 1, F8_E5M2: 1,
};
/** More than any real header (the largest are a few MB); refuses absurd lengths early. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export interface SafetensorsTensor {
  name: string;
  dtype: DType;
  /** HF order, e.g. [out, in] for a linear weight. */
  shape: number[];
  /** Absolute byte offset of the tensor's data in the file. */
  offset: number;
  bytes: number;
}

export interface SafetensorsFile {
  tensors: SafetensorsTensor[];
  /** The optional `__metadata__` string map. */
  metadata: Record<string, string>;
}

export function readSafetensors(file: MappedFile): SafetensorsFile {
  const fail = (detail: string): never => {
    throw new ModelFormatError(file.path, detail);
  };
  const bytes = file.bytes;
  const size = bytes.byteLength;
  if (size === 0) fail("empty file (0 bytes), not a safetensors file");
  if (size < 8) fail(`truncated safetensors: ${size} bytes, too short for the 8-byte header length`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, size);
  const headerLen = view.getBigUint64(0, true);
  if (headerLen > BigInt(size - 8)) {
    fail(`truncated safetensors: header length ${headerLen} is larger than the rest of the file (${size - 8} bytes)`);
  }
  if (headerLen > BigInt(MAX_HEADER_BYTES)) fail(`header length ${headerLen} is absurdly large`);
  const dataStart = 8 + Number(headerLen);
  const dataSize = size - dataStart;

  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, dataStart)));
  } catch (e) {
    return fail(`header is not valid JSON: ${(e as Error).message}`);
  }
  if (!isObject(header)) return fail("header is not a JSON object");

  const metadata: Record<string, string> = {};
  const tensors: SafetensorsTensor[] = [];
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") {
      if (!isObject(entry)) return fail(`__metadata__ is not an object`);
      for (const [k, v] of Object.entries(entry)) {
        if (typeof v !== "string") return fail(`__metadata__.${k} is not a string: ${shown(v)}`);
        metadata[k] = v;
      }
      continue;
    }
    if (!isObject(entry)) fail(`tensor ${name}: header entry is not an object`);
    const e = entry as Record<string, unknown>;
    const dtypeName = e.dtype;
    if (typeof dtypeName !== "string") return fail(`tensor ${name}: missing dtype`);
    const shape = e.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      return fail(`tensor ${name}: bad shape ${shown(shape)}`);
    }
    const range = e.data_offsets;
    if (
      !Array.isArray(range) || range.length !== 2 ||
      !range.every((o) => Number.isSafeInteger(o) && o >= 0) || range[0] > range[1]
    ) {
      return fail(`tensor ${name}: bad data_offsets ${shown(range)}`);
    }
    const [begin, end] = range as [number, number];
    if (end > dataSize) {
      fail(
        `truncated safetensors: tensor ${name} data_offsets [${begin}, ${end}] end past the data section ` +
          `(${dataSize} bytes; file has ${size} bytes)`,
      );
    }
    const dtype = Object.hasOwn(DTYPES, dtypeName) ? DTYPES[dtypeName] : undefined;
    if (dtype === undefined) return fail(`tensor ${name}: unsupported dtype ${dtypeName} (supported: F32, F16, BF16)`);
    const count = (shape as number[]).reduce((a, b) => a * b, 1);
    const expectedBytes = count * ELEMENT_BYTES[dtypeName]!;
    if (end - begin !== expectedBytes) {
      fail(
        `tensor ${name}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes, but ${dtypeName} ` +
          `[${(shape as number[]).join(", ")}] needs ${expectedBytes}`,
      );
    }
    tensors.push({ name, dtype, shape: shape as number[], offset: dataStart + begin, bytes: expectedBytes });
  }
  checkNoOverlap(tensors, fail);
  return { tensors, metadata };
}

function checkNoOverlap(tensors: SafetensorsTensor[], fail: (detail: string) => never): void {
  const sorted = tensors.filter((t) => t.bytes > 0).sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!;
    if (sorted[i]!.offset < prev.offset + prev.bytes) {
      fail(`tensors ${prev.name} and ${sorted[i]!.name} overlap in the data section`);
    }
  }
}

/** The `weight_map` (tensor name -> shard file name) of a `model.safetensors.index.json`. */
export function parseSafetensorsIndex(path: string, text: string): Map<string, string> {
  let index: unknown;
  try {
    index = JSON.parse(text);
  } catch (e) {
    throw new ModelFormatError(path, `not valid JSON: ${(e as Error).message}`);
  }
  const weightMap = isObject(index) ? index.weight_map : undefined;
  if (!isObject(weightMap)) throw new ModelFormatError(path, "missing weight_map object");
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap)) {
    if (!isFileName(shard)) throw new ModelFormatError(path, `weight_map entry ${name}: bad shard file name ${shown(shard)}`);
    map.set(name, shard);
  }
  return map;
}

const utf8 = new TextEncoder();

/** A plain name of a file beside the index: no directories, at most NAME_MAX (255) bytes. */
function isFileName(x: unknown): x is string {
  return typeof x === "string" && x !== "" && x !== "." && x !== ".." && !/[/\\]/.test(x) && utf8.encode(x).byteLength <= 255;
}

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

// Mutations of model files, described as plain data (so fast-check can generate and
// shrink them, and a failure prints as a case to replay), applied to the seed models.
// Binary files are walked by a small GGUF / safetensors layout reader of our own (not
// the loaders under test), which names every field and structural boundary.

import fc from "fast-check";
import { mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import type { SeedModel } from "./fuzz-corpus.ts";

export type FieldKind = "count" | "length" | "valueType" | "scalar" | "dims" | "dim" | "tensorType" | "offset";

export type Mutation =
  /** Flip one bit at `at` modulo the header's length (or the whole file's when !inHeader). */
  | { op: "flip"; file: number; at: number; bit: number; inHeader: boolean }
  /** Cut the file at structural boundary `boundary` (mod their count), moved by `delta`. */
  | { op: "truncate"; file: number; boundary: number; delta: number }
  /** Overwrite an integer field (u32 fields take the low 32 bits). */
  | { op: "setField"; file: number; kind: FieldKind; field: number; value: bigint }
  /** GGUF: give tensor `tensor` the name of another of the same length, or break its name. */
  | { op: "rename"; file: number; tensor: number; duplicate: boolean }
  /** JSON (or a safetensors header): replace the value at a path with raw JSON text, or delete it. */
  | { op: "json"; file: number; path: number; remove: boolean; raw: string }
  /** safetensors header: copy one tensor's entry over another's (duplicate data, overlap). */
  | { op: "copyEntry"; file: number; from: number; to: number };

export interface FuzzCase {
  seed: number;
  mutations: Mutation[];
}

// ---- layouts -------------------------------------------------------------------------

interface Field {
  at: number;
  size: 4 | 8;
  kind: FieldKind;
}

interface Layout {
  fields: Field[];
  /** Offsets where one structure ends and the next begins. */
  boundaries: number[];
  /** Where the header ends (half the bit flips land before it). */
  headerEnd: number;
  /** GGUF tensor names as [offset, length]. */
  names: [number, number][];
}

const SCALAR_SIZE: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };

/** Walks a valid GGUF (a seed file) and lists its fields and boundaries. */
export function ggufLayout(bytes: Uint8Array): Layout {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const fields: Field[] = [];
  const boundaries: number[] = [0];
  const names: [number, number][] = [];
  let pos = 0;
  const field = (size: 4 | 8, kind: FieldKind): number => {
    fields.push({ at: pos, size, kind });
    const v = size === 4 ? view.getUint32(pos, true) : Number(view.getBigUint64(pos, true));
    pos += size;
    boundaries.push(pos);
    return v;
  };
  const string = (): [number, number] => {
    const len = field(8, "length");
    const span: [number, number] = [pos, len];
    pos += len;
    boundaries.push(pos);
    return span;
  };
  const value = (type: number): void => {
    if (type === 8) string();
    else if (type === 9) {
      const elem = field(4, "valueType");
      const count = field(8, "count");
      for (let i = 0; i < count; i++) value(elem);
    } else {
      const size = SCALAR_SIZE[type]!;
      if (size >= 4) field(size as 4 | 8, "scalar");
      else {
        pos += size;
        boundaries.push(pos);
      }
    }
  };
  pos = 8;
  boundaries.push(4, 8);
  const tensorCount = field(8, "count");
  const kvCount = field(8, "count");
  for (let i = 0; i < kvCount; i++) {
    string();
    value(field(4, "valueType"));
  }
  const offsets: number[] = [];
  for (let i = 0; i < tensorCount; i++) {
    names.push(string());
    const nDims = field(4, "dims");
    for (let d = 0; d < nDims; d++) field(8, "dim");
    field(4, "tensorType");
    offsets.push(field(8, "offset"));
  }
  const headerEnd = pos;
  const dataStart = Math.ceil(pos / 32) * 32;
  for (const o of offsets) boundaries.push(dataStart + o);
  boundaries.push(bytes.byteLength);
  return { fields, boundaries, headerEnd, names };
}

/** A safetensors file's header length field, JSON structure and tensor data boundaries. */
function safetensorsLayout(bytes: Uint8Array): Layout {
  const headerLen = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const headerEnd = 8 + headerLen;
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, headerEnd))) as Record<string, { data_offsets?: number[] }>;
  const boundaries = [0, 4, 8, ...jsonBoundaries(bytes.subarray(8, headerEnd)).map((b) => 8 + b), headerEnd];
  for (const entry of Object.values(header)) for (const o of entry.data_offsets ?? []) boundaries.push(headerEnd + o);
  return { fields: [{ at: 0, size: 8, kind: "length" }], boundaries, headerEnd, names: [] };
}

/** Offsets of JSON's structural characters, and just past them. */
function jsonBoundaries(text: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < text.byteLength; i++) {
    if ("{}[],:\"".includes(String.fromCharCode(text[i]!))) out.push(i, i + 1);
  }
  return out;
}

/** The fields and boundaries of a file, by its kind (name). */
export function layoutOf(name: string, bytes: Uint8Array): Layout {
  if (name.endsWith(".gguf")) return ggufLayout(bytes);
  if (name.endsWith(".safetensors")) return safetensorsLayout(bytes);
  return { fields: [], boundaries: [0, ...jsonBoundaries(bytes), bytes.byteLength], headerEnd: bytes.byteLength, names: [] };
}

// ---- applying mutations -----------------------------------------------------------------

const pick = <T>(list: readonly T[], i: number): T | undefined => (list.length === 0 ? undefined : list[i % list.length]);

/** Every path into a JSON value (the root is []). */
function jsonPaths(v: unknown, prefix: (string | number)[] = [], out: (string | number)[][] = []): (string | number)[][] {
  out.push(prefix);
  if (Array.isArray(v)) v.forEach((x, i) => jsonPaths(x, [...prefix, i], out));
  else if (v !== null && typeof v === "object") for (const [k, x] of Object.entries(v)) jsonPaths(x, [...prefix, k], out);
  return out;
}

const MARK = "\u0000fuzz-mark\u0000";

/** JSON text with the value at the `path`-th path replaced by `raw` (or removed). */
function mutateJsonText(text: string, m: Extract<Mutation, { op: "json" }>): string {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    return text; // already broken by an earlier mutation
  }
  const path = pick(jsonPaths(doc), m.path)!;
  if (path.length === 0) return m.remove ? "" : m.raw;
  const parent = path.slice(0, -1).reduce((o: any, k) => o[k], doc) as any;
  const key = path[path.length - 1]!;
  if (m.remove) {
    if (Array.isArray(parent)) parent.splice(key as number, 1);
    else delete parent[key];
    return JSON.stringify(doc);
  }
  parent[key] = MARK;
  return JSON.stringify(doc).replace(JSON.stringify(MARK), () => m.raw);
}

/** A safetensors file whose header JSON is rewritten by `edit` (data section kept). */
function rewriteHeader(bytes: Uint8Array, edit: (text: string) => string): Uint8Array {
  if (bytes.byteLength < 8) return bytes;
  const headerLen = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true);
  if (headerLen > BigInt(bytes.byteLength - 8)) return bytes;
  const end = 8 + Number(headerLen);
  const text = edit(new TextDecoder().decode(bytes.subarray(8, end)));
  const header = new TextEncoder().encode(text);
  const out = new Uint8Array(8 + header.byteLength + bytes.byteLength - end);
  new DataView(out.buffer).setBigUint64(0, BigInt(header.byteLength), true);
  out.set(header, 8);
  out.set(bytes.subarray(end), 8 + header.byteLength);
  return out;
}

function copyEntry(text: string, from: number, to: number): string {
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(text);
  } catch {
    return text;
  }
  if (header === null || typeof header !== "object") return text;
  const names = Object.keys(header).filter((k) => k !== "__metadata__");
  const a = pick(names, from);
  const b = pick(names, to);
  if (a === undefined || b === undefined) return text;
  header[b] = structuredClone(header[a]);
  return JSON.stringify(header);
}

function apply(name: string, bytes: Uint8Array, layout: Layout, m: Mutation): Uint8Array {
  const isSafetensors = name.endsWith(".safetensors");
  switch (m.op) {
    case "flip": {
      const span = Math.min(bytes.byteLength, m.inHeader ? layout.headerEnd : bytes.byteLength);
      if (span === 0) return bytes;
      const at = m.at % span;
      const out = bytes.slice();
      out[at]! ^= 1 << m.bit;
      return out;
    }
    case "truncate": {
      const at = pick(layout.boundaries, m.boundary)! + m.delta;
      return at >= 0 && at < bytes.byteLength ? bytes.slice(0, at) : bytes;
    }
    case "setField": {
      const f = pick(layout.fields.filter((x) => x.kind === m.kind), m.field) ?? pick(layout.fields, m.field);
      if (!f || f.at + f.size > bytes.byteLength) return bytes;
      const out = bytes.slice();
      const view = new DataView(out.buffer);
      if (f.size === 4) view.setUint32(f.at, Number(BigInt.asUintN(32, m.value)), true);
      else view.setBigUint64(f.at, BigInt.asUintN(64, m.value), true);
      return out;
    }
    case "rename": {
      const [at, len] = pick(layout.names, m.tensor) ?? [0, 0];
      if (len === 0 || at + len > bytes.byteLength) return bytes;
      const out = bytes.slice();
      const donor = m.duplicate ? layout.names.find(([a, l]) => l === len && a !== at) : undefined;
      if (donor) out.copyWithin(at, donor[0], donor[0] + len);
      else out[at + len - 1] = 0x58; // "X": a name no loader knows
      return out;
    }
    case "json": {
      if (isSafetensors) return rewriteHeader(bytes, (t) => mutateJsonText(t, m));
      if (name.endsWith(".gguf")) return bytes;
      return new TextEncoder().encode(mutateJsonText(new TextDecoder().decode(bytes), m));
    }
    case "copyEntry":
      return isSafetensors ? rewriteHeader(bytes, (t) => copyEntry(t, m.from, m.to)) : bytes;
  }
}

export interface Materialized {
  /** What the loaders are given. */
  path: string;
  /** Names of the files the mutations changed. */
  mutated: string[];
  /** Bytes of all the case's files. */
  bytes: number;
}

/** A seed file's bytes and layout, read once. */
const seedFiles = new Map<string, { bytes: Uint8Array; layout: Layout }>();
function seedFile(path: string): { bytes: Uint8Array; layout: Layout } {
  let entry = seedFiles.get(path);
  if (!entry) {
    const bytes = new Uint8Array(readFileSync(path));
    entry = { bytes, layout: layoutOf(path, bytes) };
    seedFiles.set(path, entry);
  }
  return entry;
}

/** Writes the case's files into `dir`: mutated copies, links to the untouched seed files. */
export function materialize(c: FuzzCase, seeds: SeedModel[], dir: string): Materialized {
  const seed = seeds[c.seed % seeds.length]!;
  const contents = new Map<string, Uint8Array>();
  for (const m of c.mutations) {
    const name = pick(seed.files, m.file)!;
    const original = seedFile(join(seed.dir, name));
    contents.set(name, apply(name, contents.get(name) ?? original.bytes, original.layout, m));
  }
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  let bytes = 0;
  for (const name of seed.files) {
    const changed = contents.get(name);
    if (changed) writeFileSync(join(dir, name), changed);
    else symlinkSync(join(seed.dir, name), join(dir, name));
    bytes += (changed ?? seedFile(join(seed.dir, name)).bytes).byteLength;
  }
  const path = seed.path === seed.dir ? dir : join(dir, basename(seed.path));
  return { path, mutated: [...contents.keys()], bytes };
}

// ---- generators -----------------------------------------------------------------------

const U64 = 2n ** 64n;
/** Integers around the edges a reader must survive: zero, sign and width limits, 2^53. */
const EDGE_INTEGERS = [
  0n, 1n, 2n, 3n, 4n, 5n, 7n, 8n, 9n, 12n, 13n, 16n, 24n, 28n, 30n, 31n, 32n, 33n, 34n, 39n, 40n, 64n, 255n, 256n,
  0x7fffffffn, 0x80000000n, 0xffffffffn, 2n ** 32n, 2n ** 32n + 1n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n,
  2n ** 62n, 2n ** 63n - 1n, 2n ** 63n, U64 - 1n, U64 - 8n, U64 - 32n,
];

/** Raw JSON values of every type, with edge numbers, odd strings and deep nesting. */
const EDGE_JSON = [
  "0", "1", "-1", "2", "16", "32", "0.5", "-0.0", "1e-320", "1e308", "1e400", "-1e400", "2147483648", "4294967296",
  "9007199254740993", "18446744073709551616", "-9223372036854775809", "null", "true", "false", '""', '"x"',
  '"silu"', '"gelu"', '"F32"', '"F64"', '"I8"', '"BF16"', '"Q8_0"', '"LlamaForCausalLM"', '"MistralForCausalLM"',
  '"Qwen2ForCausalLM"', '"constructor"', '"__proto__"', '"toString"', '"../model.safetensors"', '"model.safetensors"', '"\\ud800"', '"<s>"', '"▁"',
  "[]", "{}", "[-1]", "[0, 0]", "[1, 2, 3]", "[4294967296, 4294967296]", "[9007199254740992, 9007199254740992]",
  "[0, 18446744073709551615]", "[18446744073709551615, 0]", "[0, 9007199254740993]",
  "[32, 32, 32, 32, 32]", '{"a": 1}', '{"content": 5}', '[{"name": 1}]', '{"type": "BPE"}',
  "[".repeat(5000) + "]".repeat(5000), JSON.stringify("a".repeat(1 << 20)),
];

export function mutationArb(): fc.Arbitrary<Mutation> {
  const file = fc.nat(7);
  // Indexes are taken modulo what they index, so they are drawn uniformly.
  const index = fc.noBias(fc.nat());
  return fc.oneof(
    fc.record({ op: fc.constant("flip" as const), file, at: index, bit: fc.nat(7), inHeader: fc.boolean() }),
    fc.record({ op: fc.constant("truncate" as const), file, boundary: index, delta: fc.constantFrom(0, 0, -1, 1) }),
    fc.record({
      op: fc.constant("setField" as const),
      file,
      kind: fc.constantFrom<FieldKind>("count", "length", "valueType", "scalar", "dims", "dim", "tensorType", "offset"),
      field: index,
      value: fc.oneof(fc.constantFrom(...EDGE_INTEGERS), fc.bigInt({ min: 0n, max: U64 - 1n }), fc.nat(40).map(BigInt)),
    }),
    fc.record({ op: fc.constant("rename" as const), file, tensor: index, duplicate: fc.boolean() }),
    fc.record({
      op: fc.constant("json" as const),
      file,
      path: index,
      remove: fc.boolean(),
      raw: fc.oneof(fc.constantFrom(...EDGE_JSON), fc.string({ unit: "binary" }).map((s) => JSON.stringify(s)), fc.integer().map(String)),
    }),
    fc.record({ op: fc.constant("copyEntry" as const), file, from: index, to: index }),
  );
}

export function caseArb(): fc.Arbitrary<FuzzCase> {
  return fc.record({ seed: fc.nat(), mutations: fc.array(mutationArb(), { minLength: 1, maxLength: 3 }) });
}

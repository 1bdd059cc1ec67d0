// Malformed, truncated and inconsistent model files are refused with a ModelFormatError
// naming the file and the problem, never a crash, a RangeError or a hang.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType, type Backend, type MappedFile } from "../../src/backend/backend.ts";
import { createBackend } from "../../src/backend/index.ts";
import { createKVCache } from "../../src/kv/cache.ts";
import { ModelFormatError, ModelTooLargeError } from "../../src/model/errors.ts";
import { GGUFValueType, readGGUF } from "../../src/model/gguf.ts";
import { loadModel } from "../../src/model/registry.ts";
import { bufferBytes, loadModelFiles } from "../../src/model/load.ts";
import { readSafetensors } from "../../src/model/safetensors.ts";
import { bytesMapped, readMapped } from "../helpers/mapped.ts";
import { encodeGGUF, encodeSafetensors, ggufValue as gv } from "../../src/model/write.ts";
import { writeTinyModel, type TinyDims } from "../helpers/tiny-model.ts";

const tmp = mkdtempSync(join(tmpdir(), "specinfer-badfiles-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const DIMS: TinyDims = { vocab: 40, hidden: 32, intermediate: 64, layers: 2, heads: 2, kvHeads: 1 };
let dirCount = 0;
const freshDir = () => join(tmp, `m${dirCount++}`);

/** Runs `fn`, which must throw a ModelFormatError whose message names `file` and matches every pattern. */
function expectRefused(fn: () => unknown, file: string, ...patterns: (string | RegExp)[]): string {
  let error: unknown;
  try {
    fn();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(ModelFormatError);
  const message = (error as Error).message;
  expect(message).toContain(file);
  for (const p of patterns) {
    if (typeof p === "string") expect(message).toContain(p);
    else expect(message).toMatch(p);
  }
  return message;
}

const load = (path: string) => loadModelFiles(path, readMapped);

/** Same-length rename of a tensor name inside a file's header. */
function renameInPlace(bytes: Buffer, from: string, to: string): Buffer {
  const at = bytes.indexOf(from);
  expect(at).toBeGreaterThan(0);
  bytes.write(to, at);
  return bytes;
}

/** An HF dir whose model.safetensors is replaced by `bytes`. */
function hfDirWith(bytes: Uint8Array): { dir: string; file: string } {
  const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors" }).path;
  const file = join(dir, "model.safetensors");
  writeFileSync(file, bytes);
  return { dir, file };
}

function u64Header(length: number, rest: string): Uint8Array {
  const body = new TextEncoder().encode(rest);
  const out = new Uint8Array(8 + body.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(length), true);
  out.set(body, 8);
  return out;
}

describe("safetensors", () => {
  test("header length larger than the file", () => {
    const { dir, file } = hfDirWith(u64Header(1000, "{}"));
    expectRefused(() => load(dir), file, "truncated safetensors", "header length 1000 is larger than the rest of the file (2 bytes)");
  });

  test("data_offsets past the end (file cut short)", () => {
    const whole = readFileSync(writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F16", format: "safetensors" }).path + "/model.safetensors");
    const { dir, file } = hfDirWith(whole.subarray(0, whole.byteLength - 10));
    expectRefused(() => load(dir), file, "truncated safetensors", /tensor lm_head\.weight data_offsets \[\d+, \d+\] end past the data section/);
  });

  test("header JSON that does not parse", () => {
    const { dir, file } = hfDirWith(u64Header(9, '{"a": [1,'));
    expectRefused(() => load(dir), file, "header is not valid JSON");
  });

  test("unsupported dtypes I64 and F8_E4M3", () => {
    for (const dtype of ["I64", "F8_E4M3"]) {
      const bytes = encodeSafetensors([{ name: "model.embed_tokens.weight", dtype, shape: [2, 4], data: new Uint8Array(dtype === "I64" ? 64 : 8) }]);
      const { dir, file } = hfDirWith(bytes);
      expectRefused(() => load(dir), file, `tensor model.embed_tokens.weight: unsupported dtype ${dtype}`);
    }
  });

  test("data_offsets that disagree with dtype and shape", () => {
    const bytes = encodeSafetensors([{ name: "w", dtype: "F32", shape: [3, 4], data: new Uint8Array(40) }]);
    expectRefused(() => readSafetensors(bytesMapped("x.safetensors", bytes)), "x.safetensors", "hold 40 bytes, but F32 [3, 4] needs 48");
  });

  test("tensor shape disagreeing with config.json", () => {
    const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors" }).path;
    const configPath = join(dir, "config.json");
    const config = JSON.parse(readFileSync(configPath, "utf8"));
    writeFileSync(configPath, JSON.stringify({ ...config, intermediate_size: 65 }));
    expectRefused(
      () => load(dir), join(dir, "model.safetensors"),
      "tensor model.layers.0.mlp.gate_proj.weight has shape [64, 32], config.json says [65, 32]",
    );
  });

  test("missing tensor", () => {
    const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors" }).path;
    const file = join(dir, "model.safetensors");
    writeFileSync(file, renameInPlace(readFileSync(file), "model.norm.weight", "model.norm.weighX"));
    expectRefused(() => load(dir), file, "missing tensor model.norm.weight");
  });

  test("sharded: the index lists a tensor its shard lacks", () => {
    const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors", shards: 2 }).path;
    const indexPath = join(dir, "model.safetensors.index.json");
    const index = JSON.parse(readFileSync(indexPath, "utf8"));
    index.weight_map["model.extra.weight"] = "model-00002-of-00002.safetensors";
    writeFileSync(indexPath, JSON.stringify(index));
    expectRefused(() => load(dir), join(dir, "model-00002-of-00002.safetensors"), "missing tensor model.extra.weight (model.safetensors.index.json lists it here)");
  });

  test("config.json without a required key", () => {
    const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors" }).path;
    const configPath = join(dir, "config.json");
    const { hidden_size: _, ...config } = JSON.parse(readFileSync(configPath, "utf8"));
    writeFileSync(configPath, JSON.stringify(config));
    expectRefused(() => load(dir), configPath, "missing key hidden_size");
  });

  test("a file of the directory instead of the directory", () => {
    const { dir, file } = hfDirWith(new Uint8Array(8));
    expectRefused(() => load(file), file, "pass the model's directory");
    expectRefused(() => load(join(dir, "config.json")), join(dir, "config.json"), "pass the model's directory");
  });

  test("empty file", () => {
    const { dir, file } = hfDirWith(new Uint8Array(0));
    expectRefused(() => load(dir), file, "empty file");
    expectRefused(() => readSafetensors(bytesMapped(file, new Uint8Array(0))), file, "empty file");
  });
});

/** A small llama GGUF with a tokenizer, so metadata holds string and number arrays. */
function smallGGUF(): { path: string; bytes: Buffer } {
  const tokens = Array.from({ length: DIMS.vocab }, (_, i) => `tok${i}`);
  const m = writeTinyModel(freshDir(), {
    seed: 1, dims: DIMS, dtype: "Q8_0", format: "gguf",
    ggufMetadata: {
      "tokenizer.ggml.model": "llama",
      "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.scores": new Float32Array(DIMS.vocab),
      "tokenizer.ggml.token_type": new Int32Array(DIMS.vocab).fill(1),
      "tokenizer.chat_template": "{{ messages }}",
    },
  });
  return { path: m.path, bytes: readFileSync(m.path) };
}

describe("GGUF", () => {
  test("bad magic", () => {
    const { path, bytes } = smallGGUF();
    bytes.set(new TextEncoder().encode("GGML"), 0);
    writeFileSync(path, bytes);
    expectRefused(() => load(path), path, 'bad magic (bytes 47 47 4d 4c), expected "GGUF"');
  });

  test("bad version", () => {
    for (const version of [1, 4]) {
      const bytes = encodeGGUF({}, [], { version });
      expectRefused(() => readGGUF(bytesMapped("v.gguf", bytes)), "v.gguf", `unsupported GGUF version ${version}`);
    }
    const bigEndian = encodeGGUF({}, [], { version: 0x03000000 });
    expectRefused(() => readGGUF(bytesMapped("be.gguf", bigEndian)), "be.gguf", "big-endian");
  });

  test("truncated in the metadata", () => {
    const { path, bytes } = smallGGUF();
    // Inside the token list, and inside the scores that follow it.
    writeFileSync(path, bytes.subarray(0, bytes.indexOf("tok20") + 2));
    expectRefused(() => load(path), path, "truncated GGUF", "metadata tokenizer.ggml.tokens claims 40 elements");
    const scoresEnd = bytes.indexOf("tokenizer.ggml.token_type");
    writeFileSync(path, bytes.subarray(0, scoresEnd - 8 - 3)); // 8: the next key's length
    expectRefused(() => load(path), path, "truncated GGUF", "metadata tokenizer.ggml.scores claims 40 elements (at least 160 bytes)");
  });

  test("truncated in the tensor data", () => {
    const { path, bytes } = smallGGUF();
    writeFileSync(path, bytes.subarray(0, bytes.byteLength - 100));
    expectRefused(() => load(path), path, "truncated GGUF", /tensor output\.weight data \[\d+, \d+\) ends past the end of the file/);
  });

  test("unsupported tensor type names the type", () => {
    const bytes = encodeGGUF({}, [{ name: "blk.0.ffn_up.weight", dims: [256, 2], type: 13, data: new Uint8Array(352) }]);
    expectRefused(() => readGGUF(bytesMapped("q5k.gguf", bytes)), "q5k.gguf", "tensor blk.0.ffn_up.weight: unsupported tensor type Q5_K (13)");
  });

  test("missing tensor", () => {
    const { path } = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F16", format: "gguf" });
    writeFileSync(path, renameInPlace(readFileSync(path), "blk.1.ffn_down.weight", "blk.1.ffn_downXweight"));
    expectRefused(() => load(path), path, "missing tensor model.layers.1.mlp.down_proj.weight");
  });

  test("metadata without a required key", () => {
    const bytes = encodeGGUF({ "general.architecture": "llama", "llama.embedding_length": gv(GGUFValueType.UINT32, 32) }, []);
    const path = join(tmp, "nokeys.gguf");
    writeFileSync(path, bytes);
    expectRefused(() => load(path), path, "missing key llama.");
  });

  test("norm weights must not be quantized", () => {
    const { path } = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "Q8_0", format: "gguf" });
    const bytes = readFileSync(path);
    // Tensor info: name, n_dims u32, one u64 dim, then the u32 type: make it Q8_0.
    const name = new TextEncoder().encode("output_norm.weight");
    const typeAt = bytes.indexOf(Buffer.from(name)) + name.byteLength + 4 + 8;
    new DataView(bytes.buffer, bytes.byteOffset).setUint32(typeAt, DType.Q8_0, true);
    writeFileSync(path, bytes);
    expectRefused(() => load(path), path, "tensor model.norm.weight is Q8_0; norm weights must be F32, F16 or BF16");
  });

  test("absurd counts and lengths are refused before allocating", () => {
    const absurdArray = encodeGGUF({ "x": gv(GGUFValueType.ARRAY, [], GGUFValueType.STRING) }, []);
    // Patch the array's element count (after key, value type and element type) to 2^50.
    const countAt = 24 + 8 + 1 + 4 + 4;
    new DataView(absurdArray.buffer).setBigUint64(countAt, 2n ** 50n, true);
    expectRefused(() => readGGUF(bytesMapped("a.gguf", absurdArray)), "a.gguf", "metadata x claims 1125899906842624 elements");

    const absurdTensors = encodeGGUF({}, []);
    new DataView(absurdTensors.buffer).setBigUint64(8, 2n ** 40n, true);
    expectRefused(() => readGGUF(bytesMapped("t.gguf", absurdTensors)), "t.gguf", "absurd tensor count 1099511627776");

    const absurdString = encodeGGUF({ "k": "v" }, []);
    new DataView(absurdString.buffer).setBigUint64(24, 2n ** 62n, true);
    expectRefused(() => readGGUF(bytesMapped("s.gguf", absurdString)), "s.gguf", "length of metadata key #0 is absurdly large");
  });

  test("every truncation and random byte damage of the header fails cleanly", () => {
    const { bytes } = smallGGUF();
    const headerEnd = readGGUF(bytesMapped("ok.gguf", bytes)).dataOffset;
    for (let len = 0; len < headerEnd; len++) {
      expectRefused(() => readGGUF(bytesMapped("cut.gguf", bytes.subarray(0, len))), "cut.gguf");
    }
    let seed = 12345;
    const next = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
    for (let i = 0; i < 400; i++) {
      const damaged = bytes.slice();
      damaged[next() % headerEnd] = next() & 0xff;
      try {
        readGGUF(bytesMapped("damaged.gguf", damaged));
      } catch (e) {
        expect(e).toBeInstanceOf(ModelFormatError);
      }
    }
  });

  test("empty file", () => {
    const path = join(tmp, "empty.gguf");
    writeFileSync(path, new Uint8Array(0));
    expectRefused(() => load(path), path, "empty file");
    expectRefused(() => readGGUF(bytesMapped(path, new Uint8Array(0))), path, "empty file");
  });
});

describe("paths", () => {
  test("a path that is not there", () => {
    const path = join(tmp, "no-such-model");
    expectRefused(() => load(path), path, "no such file or directory");
  });

  test("a directory holding no model, or two GGUFs", () => {
    const dir = freshDir();
    mkdirSync(dir);
    expectRefused(() => load(dir), dir, "no model found");
    writeFileSync(join(dir, "a.gguf"), encodeGGUF({}, []));
    writeFileSync(join(dir, "b.gguf"), encodeGGUF({}, []));
    expectRefused(() => load(dir), dir, "2 .gguf files");
    expectRefused(() => load(join(dir, "x.safetensors")), join(dir, "x.safetensors"), "no such file or directory");
    unlinkSync(join(dir, "b.gguf"));
    expectRefused(() => load(dir), join(dir, "a.gguf"), "missing key general.architecture");
  });
});

describe("memory", () => {
  /** A mapFile that records what it maps and unmaps. */
  function spyMapper() {
    const mapped: string[] = [];
    const closed: string[] = [];
    const mapFile = (path: string): MappedFile => {
      mapped.push(path);
      return { ...readMapped(path), close: () => void closed.push(path) };
    };
    return { mapped, closed, mapFile };
  }

  function refusal(fn: () => unknown): ModelTooLargeError {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(ModelTooLargeError);
      return e as ModelTooLargeError;
    }
    throw new Error("expected a ModelTooLargeError");
  }

  test("HF weights over the limit are refused before any file is mapped; buffers that do not fit, before returning", () => {
    const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors", shards: 2 }).path;
    const shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    const weightBytes = shards.reduce((sum, f) => sum + statSync(join(dir, f)).size, 0);
    const spy = spyMapper();
    const weights = refusal(() => loadModelFiles(dir, spy.mapFile, { memoryLimitBytes: weightBytes - 1 }));
    expect(weights.message).toContain(`needs ${weightBytes} bytes (0.1 MiB): its weights alone; only ${weightBytes - 1} bytes`);
    expect(spy.mapped).toEqual([]);
    const e = refusal(() => loadModelFiles(dir, spy.mapFile, { memoryLimitBytes: weightBytes }));
    expect(spy.closed).toEqual(spy.mapped);
    expect(e.availableBytes).toBe(weightBytes);
    expect(e.neededBytes).toBeGreaterThan(weightBytes);
    const mib = "bytes \\(\\d+\\.\\d MiB\\)";
    expect(e.message).toMatch(new RegExp(
      `^${dir}: the model needs ${e.neededBytes} ${mib}: ${weightBytes} ${mib} of weights \\+ \\d+ ${mib} of buffers; ` +
        `only ${weightBytes} ${mib} of memory is available \\(memoryLimitBytes\\)$`,
    ));
    // Exactly enough loads.
    loadModelFiles(dir, spy.mapFile, { memoryLimitBytes: e.neededBytes }).close();
  });

  test("a GGUF bigger than the limit is never mapped; one whose buffers do not fit is unmapped again", () => {
    const { path } = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "Q8_0", format: "gguf" });
    const fileBytes = statSync(path).size;
    const spy = spyMapper();
    const weights = refusal(() => loadModelFiles(path, spy.mapFile, { memoryLimitBytes: fileBytes - 1 }));
    expect(weights.message).toContain(`needs ${fileBytes} bytes (0.0 MiB): its weights alone; only ${fileBytes - 1} bytes`);
    expect(spy.mapped).toEqual([]);
    const buffers = refusal(() => loadModelFiles(path, spy.mapFile, { memoryLimitBytes: fileBytes }));
    expect(buffers.neededBytes).toBeGreaterThan(fileBytes);
    expect(spy.mapped).toEqual([path]);
    expect(buffers.message).toContain(`: ${fileBytes} bytes (0.0 MiB) of weights + `);
    expect(spy.closed).toEqual([path]);
    loadModelFiles(path, spy.mapFile, { memoryLimitBytes: buffers.neededBytes }).close();
  });

  test("checkMemory: false reads a model whatever the limit; a limit that is not a positive integer is refused", () => {
    const { path } = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F16", format: "gguf" });
    loadModelFiles(path, readMapped, { memoryLimitBytes: 1, checkMemory: false }).close();
    for (const bad of [0, -5, 1.5, Number.NaN]) {
      expect(() => loadModelFiles(path, readMapped, { memoryLimitBytes: bad })).toThrow(`memoryLimitBytes must be a positive number of bytes, got ${bad}`);
    }
  });

  /** A backend that counts the bytes allocated and the files mapped through it. */
  function countingBackend(backend: Backend) {
    const counts = { allocated: 0, allocations: 0, mapped: 0 };
    const proxy = new Proxy(backend, {
      get(target, prop) {
        if (prop === "alloc") {
          return (bytes: number) => {
            counts.allocated += bytes;
            counts.allocations++;
            return target.alloc(bytes);
          };
        }
        if (prop === "mapFile") {
          return (path: string, populate?: boolean) => {
            counts.mapped++;
            return target.mapFile(path, populate);
          };
        }
        const value = Reflect.get(target, prop);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    return { backend: proxy, counts };
  }

  test("SPECINFER_MEMORY_LIMIT refuses a model in loadModel before the backend maps or allocates anything", async () => {
    const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "F32", format: "safetensors" }).path;
    const { backend, counts } = countingBackend(await createBackend({ threads: 1 }));
    try {
      process.env.SPECINFER_MEMORY_LIMIT = "1000";
      const e = refusal(() => loadModel(dir, backend));
      expect(e.message).toContain("only 1000 bytes (0.0 MiB) of memory is available (SPECINFER_MEMORY_LIMIT)");
      expect(counts).toEqual({ allocated: 0, allocations: 0, mapped: 0 });
      process.env.SPECINFER_MEMORY_LIMIT = "12 GB";
      expect(() => loadModel(dir, backend)).toThrow("SPECINFER_MEMORY_LIMIT must be a positive number of bytes, got 12 GB");
    } finally {
      delete process.env.SPECINFER_MEMORY_LIMIT;
      backend.close();
    }
  });

  test("bufferBytes covers what the forward and the smallest KV cache allocate, within 10%", async () => {
    // BF16 with q/k/v biases: every norm and bias is converted to f32 in its own buffer.
    for (const maxBatchTokens of [16, 512]) {
      const dir = writeTinyModel(freshDir(), { seed: 1, dims: DIMS, dtype: "BF16", format: "safetensors", attentionBias: true }).path;
      const { backend, counts } = countingBackend(await createBackend({ threads: 1 }));
      const model = loadModel(dir, backend, { maxBatchTokens });
      const kv = createKVCache(model, { maxSeqs: 1, maxSeqLen: 16 });
      const estimate = bufferBytes(model.config, maxBatchTokens);
      expect(counts.allocated).toBeLessThanOrEqual(estimate);
      expect(estimate).toBeLessThan(1.1 * counts.allocated);
      kv.close();
      model.close();
      backend.close();
    }
  });
});

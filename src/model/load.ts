// Finds, maps and validates a model's files: an HF directory (config.json + single or
// sharded safetensors) or one GGUF file. The result is a table of TensorRefs that point
// into the mappings (nothing is copied), named and shaped the HF way.

import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { freemem } from "node:os";
import { basename, join } from "node:path";
import { DType, DTYPE_NAMES, type MappedFile, RopeLayout } from "../backend/backend.ts";
import type { ModelConfig } from "./config.ts";
import { ModelFormatError, ModelTooLargeError } from "./errors.ts";
import { readGGUF } from "./gguf.ts";
import { configFromGGUF, configFromHF, expectedTensors, familyOf, hfNameFromGGUF } from "./registry.ts";
import { parseSafetensorsIndex, readSafetensors } from "./safetensors.ts";

export interface TensorRef {
  name: string;
  dtype: DType;
  /** HF order: [out, in] for linear weights. */
  shape: number[];
  file: MappedFile;
  /** Absolute byte offset in `file`. */
  offset: number;
  bytes: number;
}

export interface LoadedModel {
  path: string;
  format: "safetensors" | "gguf";
  config: ModelConfig;
  /** How q/k rows are laid out for RoPE: Half for HF checkpoints, Interleaved for
   *  llama-arch GGUFs (whose q/k rows were permuted by the converter). */
  ropeLayout: RopeLayout;
  /** Exactly the tensors of expectedTensors(config), by HF name. */
  tensors: Map<string, TensorRef>;
  gguf?: { metadata: Map<string, unknown> };
  files: MappedFile[];
  close(): void;
}

export type MapFile = (path: string) => MappedFile;

export interface LoadOptions {
  /** Refuse a model that cannot fit memory (default true); false for readers of headers only. */
  checkMemory?: boolean;
  /** Memory the model may use, in bytes; default $SPECINFER_MEMORY_LIMIT, else the
   *  host's available memory. */
  memoryLimitBytes?: number;
  /** Tokens per forward the caller sizes its buffers for (CausalLM's maxBatchTokens). */
  maxBatchTokens?: number;
}

const NORM_DTYPES = new Set([DType.F32, DType.F16, DType.BF16]);

/** Maps and validates the model at `path`. Unless opts.checkMemory is false, a model
 *  that cannot fit the memory available is refused before the caller allocates
 *  anything: one whose files alone exceed it before they are mapped; one whose
 *  buffers do not fit once its validated shape is known (and its files unmapped). */
export function loadModelFiles(path: string, mapFile: MapFile, opts: LoadOptions = {}): LoadedModel {
  if (!existsSync(path)) throw new ModelFormatError(path, "no such file or directory");
  if (!statSync(path).isDirectory()) {
    if (/(\.safetensors|config\.json)$/.test(path)) {
      throw new ModelFormatError(path, "pass the model's directory, not one of its files");
    }
    return loadGGUF(path, mapFile, opts);
  }

  const entries = readdirSync(path);
  const safetensors = entries.filter((f) => f.endsWith(".safetensors"));
  const ggufs = entries.filter((f) => f.endsWith(".gguf"));
  if (entries.includes("config.json") || safetensors.length > 0) return loadHF(path, entries, safetensors, mapFile, opts);
  if (ggufs.length === 1) return loadGGUF(join(path, ggufs[0]!), mapFile, opts);
  throw new ModelFormatError(
    path,
    ggufs.length > 1
      ? `directory holds ${ggufs.length} .gguf files (${ggufs.join(", ")}); pass the one to load`
      : "no model found (expected config.json with *.safetensors, or one .gguf file)",
  );
}

function loadHF(dir: string, entries: string[], safetensors: string[], mapFile: MapFile, opts: LoadOptions): LoadedModel {
  const configPath = join(dir, "config.json");
  if (!entries.includes("config.json")) throw new ModelFormatError(configPath, "no such file or directory");
  const config = configFromHF(configPath, readFileSync(configPath, "utf8"));

  const indexPath = join(dir, "model.safetensors.index.json");
  let weightMap: Map<string, string> | null = null;
  let shardNames: string[];
  if (entries.includes("model.safetensors.index.json")) {
    weightMap = parseSafetensorsIndex(indexPath, readFileSync(indexPath, "utf8"));
    shardNames = [...new Set(weightMap.values())];
  } else if (safetensors.length === 1) {
    shardNames = safetensors;
  } else {
    throw new ModelFormatError(
      dir,
      safetensors.length === 0
        ? "config.json but no *.safetensors file"
        : `${safetensors.length} *.safetensors files but no model.safetensors.index.json`,
    );
  }

  const indexName = basename(indexPath);
  const shardBytes = shardNames.reduce((sum, shard) => sum + fileSize(join(dir, shard)), 0);
  checkMemory(dir, shardBytes, 0, opts);
  return withFiles((files) => {
    const found = new Map<string, TensorRef>();
    for (const shard of shardNames) {
      const shardPath = join(dir, shard);
      const file = mapChecked(shardPath, mapFile, weightMap ? ` (a shard ${indexName} lists)` : "");
      files.push(file);
      for (const t of readSafetensors(file).tensors) {
        if (found.has(t.name)) {
          throw new ModelFormatError(shardPath, `tensor ${t.name} is also in ${basename(found.get(t.name)!.file.path)}`);
        }
        const listedIn = weightMap?.get(t.name);
        if (listedIn !== undefined && listedIn !== shard) {
          throw new ModelFormatError(shardPath, `tensor ${t.name} is in this shard, but ${indexName} lists it in ${listedIn}`);
        }
        found.set(t.name, { ...t, file });
      }
    }
    if (weightMap) {
      for (const [name, shard] of weightMap) {
        if (!found.has(name)) throw new ModelFormatError(join(dir, shard), `missing tensor ${name} (${indexName} lists it here)`);
      }
    }
    const where = weightMap ? indexPath : files[0]!.path;
    const tensors = validate(config, found, where, "config.json");
    checkMemory(dir, shardBytes, bufferBytes(config, opts.maxBatchTokens), opts);
    return { path: dir, format: "safetensors", config, ropeLayout: RopeLayout.Half, tensors, files, close: closer(files) };
  });
}

function loadGGUF(path: string, mapFile: MapFile, opts: LoadOptions): LoadedModel {
  checkMemory(path, fileSize(path), 0, opts);
  return withFiles((files) => {
    const file = mapChecked(path, mapFile);
    files.push(file);
    const gguf = readGGUF(file);
    const config = configFromGGUF(path, gguf.metadata, new Set(gguf.tensors.map((t) => t.name)));
    const found = new Map<string, TensorRef>();
    for (const t of gguf.tensors) {
      if (t.name === "rope_freqs.weight") {
        config.ropeFreqFactors = ropeFreqFactors(file, t, config);
        continue;
      }
      const name = hfNameFromGGUF(t.name, config.arch, config);
      if (name) found.set(name, { name, dtype: t.dtype, shape: [...t.dims].reverse(), file, offset: t.offset, bytes: t.bytes });
    }
    const tensors = validate(config, found, path, "GGUF metadata");
    checkMemory(path, file.size, bufferBytes(config, opts.maxBatchTokens), opts);
    // llama.cpp's converters permute q/k rows for the adjacent-pair RoPE of its llama
    // graph; qwen2 GGUFs keep the HF rows and rotate halves (NEOX).
    // Falcon's converter keeps HF's rows too.
    const ropeLayout = config.arch === "llama" || config.arch === "mistral" ? RopeLayout.Interleaved : RopeLayout.Half;
    return {
      path, format: "gguf", config, ropeLayout, tensors, gguf: { metadata: gguf.metadata }, files, close: closer(files),
    };
  });
}

/** Llama-3 GGUFs from llama.cpp carry RoPE scaling as per-pair frequency divisors. */
function ropeFreqFactors(file: MappedFile, t: { dims: number[]; dtype: DType; offset: number }, cfg: ModelConfig): Float32Array {
  if (t.dtype !== DType.F32 || t.dims.length !== 1 || t.dims[0] !== cfg.headDim / 2) {
    throw new ModelFormatError(
      file.path,
      `tensor rope_freqs.weight must be F32 [${cfg.headDim / 2}], got ${DTYPE_NAMES[t.dtype]} [${t.dims.join(", ")}]`,
    );
  }
  // Copied: it is tiny and the file gives no 4-byte alignment guarantee for a view.
  const bytes = file.bytes.slice(t.offset, t.offset + t.dims[0]! * 4);
  return new Float32Array(bytes.buffer);
}

/** Checks every expected tensor is present with the expected shape and a usable dtype;
 *  returns exactly the expected ones (extras such as rotary_emb.inv_freq are ignored). */
function validate(
  config: ModelConfig, found: Map<string, TensorRef>, where: string, configSource: string,
): Map<string, TensorRef> {
  const missing = (name: string) => new ModelFormatError(where, `missing tensor ${name} (${configSource} asks for it)`);
  // Layers first, one tensor each: a damaged layer count (say 2^27) must not make
  // expectedTensors list a billion tensors before the first is found missing.
  const family = familyOf(config.arch);
  for (let l = 0; l < config.numLayers; l++) {
    const name = family.layerTensor(l);
    if (!found.has(name)) throw missing(name);
  }
  const tensors = new Map<string, TensorRef>();
  for (const want of expectedTensors(config)) {
    const t = found.get(want.name);
    if (!t) throw missing(want.name);
    if (t.shape.length !== want.shape.length || t.shape.some((d, i) => d !== want.shape[i])) {
      throw new ModelFormatError(
        t.file.path,
        `tensor ${want.name} has shape [${t.shape.join(", ")}], ${configSource} says [${want.shape.join(", ")}]`,
      );
    }
    if (want.kind !== "matrix" && !NORM_DTYPES.has(t.dtype)) {
      throw new ModelFormatError(
        t.file.path,
        `tensor ${want.name} is ${DTYPE_NAMES[t.dtype]}; ${want.kind} weights must be F32, F16 or BF16`,
      );
    }
    tensors.set(want.name, t);
  }
  return tensors;
}

// ---- memory ---------------------------------------------------------------------------

/** Bytes a model needs beside its weights: a model's activation and batch buffers for
 *  `maxBatchTokens` tokens (its logits capped at 64 MB as it caps them) and the
 *  smallest KV cache, one 16-slot f32 block per layer. An estimate kept a little above
 *  what the forward allocates (test/model/bad-files.test.ts checks it). */
export function bufferBytes(c: ModelConfig, maxBatchTokens = 512): number {
  const n = maxBatchTokens;
  const logitRows = Math.max(1, Math.min(n, Math.floor((64 << 20) / (4 * c.vocabSize))));
  const qDim = c.numHeads * c.headDim;
  const kvDim = c.numKvHeads * c.headDim;
  const activations = n * (2 * c.hiddenSize + 2 * qDim + 2 * kvDim + 2 * c.intermediateSize) + logitRows * (c.hiddenSize + c.vocabSize);
  const batch = n * (4 + Math.max(64, Math.ceil(n / 32))) + logitRows;
  // Norm weights and biases converted to f32 (each with a one-float index), and RoPE's
  // inverse frequencies.
  const vectors = c.numLayers * (2 * c.hiddenSize + qDim + 2 * kvDim + 5) + c.hiddenSize + 1 + c.headDim / 2;
  const kv = 2 * c.numLayers * 16 * kvDim;
  return 4 * (activations + batch + vectors + kv);
}

/** The memory figure a load is held to, and where it came from. */
function memoryLimit(opts: LoadOptions): { bytes: number; source: string } {
  const given = (bytes: number, source: string, raw: unknown) => {
    if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new Error(`${source} must be a positive number of bytes, got ${raw}`);
    return { bytes, source };
  };
  if (opts.memoryLimitBytes !== undefined) return given(opts.memoryLimitBytes, "memoryLimitBytes", opts.memoryLimitBytes);
  const env = process.env.SPECINFER_MEMORY_LIMIT;
  if (env) return given(Number(env), "SPECINFER_MEMORY_LIMIT", env);
  // MemAvailable counts the page cache the kernel can reclaim (where mapped weights
  // live); os.freemem does not, so it is only the fallback where /proc is absent.
  const meminfo = existsSync("/proc/meminfo") ? /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync("/proc/meminfo", "utf8")) : null;
  return meminfo ? { bytes: Number(meminfo[1]) * 1024, source: "MemAvailable in /proc/meminfo" } : { bytes: freemem(), source: "os.freemem()" };
}

function checkMemory(path: string, weightBytes: number, buffers: number, opts: LoadOptions): void {
  if (opts.checkMemory === false) return;
  const limit = memoryLimit(opts);
  const needed = weightBytes + buffers;
  if (needed <= limit.bytes) return;
  const what = buffers > 0 ? `${size(weightBytes)} of weights + ${size(buffers)} of buffers` : "its weights alone";
  throw new ModelTooLargeError(
    path, needed, limit.bytes,
    `the model needs ${size(needed)}: ${what}; only ${size(limit.bytes)} of memory is available (${limit.source})`,
  );
}

const size = (bytes: number) => `${bytes} bytes (${(bytes / 2 ** 20).toFixed(1)} MiB)`;

const fileSize = (path: string) => (existsSync(path) ? statSync(path).size : 0);

/** Maps a file after checking it is there and not empty (mmap refuses empty files);
 *  `why` says who named the file, for the error. */
function mapChecked(path: string, mapFile: MapFile, why = ""): MappedFile {
  if (!existsSync(path)) throw new ModelFormatError(path, `no such file or directory${why}`);
  const stat = statSync(path);
  if (!stat.isFile()) throw new ModelFormatError(path, `not a regular file${why}`);
  if (stat.size === 0) throw new ModelFormatError(path, `empty file (0 bytes)${why}`);
  return mapFile(path);
}

/** Runs `build` with a list it fills with mappings; unmaps them all if it throws. */
function withFiles(build: (files: MappedFile[]) => LoadedModel): LoadedModel {
  const files: MappedFile[] = [];
  try {
    return build(files);
  } catch (e) {
    for (const f of files) f.close();
    throw e;
  }
}

function closer(files: MappedFile[]): () => void {
  let closed = false;
  return () => {
    if (closed) return;
    closed = true;
    for (const f of files) f.close();
  };
}

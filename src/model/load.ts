// Finds, maps and validates a model's files: an HF directory (config.json + single or
// sharded safetensors) or one GGUF file. The result is a table of TensorRefs that point
// into the mappings (nothing is copied), named and shaped the HF way.

import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import { DType, DTYPE_NAMES, type MappedFile, RopeLayout } from "../backend/backend.ts";
import { expectedTensors, hfNameFromGGUF } from "./arch.ts";
import { configFromGGUF, configFromHF, type ModelConfig } from "./config.ts";
import { ModelFormatError } from "./errors.ts";
import { readGGUF } from "./gguf.ts";
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

const NORM_DTYPES = new Set([DType.F32, DType.F16, DType.BF16]);

export function loadModelFiles(path: string, mapFile: MapFile): LoadedModel {
  if (!existsSync(path)) throw new ModelFormatError(path, "no such file or directory");
  if (!statSync(path).isDirectory()) {
    if (/(\.safetensors|config\.json)$/.test(path)) {
      throw new ModelFormatError(path, "pass the model's directory, not one of its files");
    }
    return loadGGUF(path, mapFile);
  }

  const entries = readdirSync(path);
  const safetensors = entries.filter((f) => f.endsWith(".safetensors"));
  const ggufs = entries.filter((f) => f.endsWith(".gguf"));
  if (entries.includes("config.json") || safetensors.length > 0) return loadHF(path, entries, safetensors, mapFile);
  if (ggufs.length === 1) return loadGGUF(join(path, ggufs[0]!), mapFile);
  throw new ModelFormatError(
    path,
    ggufs.length > 1
      ? `directory holds ${ggufs.length} .gguf files (${ggufs.join(", ")}); pass the one to load`
      : "no model found (expected config.json with *.safetensors, or one .gguf file)",
  );
}

function loadHF(dir: string, entries: string[], safetensors: string[], mapFile: MapFile): LoadedModel {
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

  return withFiles((files) => {
    const found = new Map<string, TensorRef>();
    for (const shard of shardNames) {
      const shardPath = join(dir, shard);
      const file = mapChecked(shardPath, mapFile);
      files.push(file);
      for (const t of readSafetensors(file).tensors) {
        if (found.has(t.name)) {
          throw new ModelFormatError(shardPath, `tensor ${t.name} is also in ${basename(found.get(t.name)!.file.path)}`);
        }
        if (weightMap && weightMap.get(t.name) !== undefined && weightMap.get(t.name) !== shard) {
          throw new ModelFormatError(shardPath, `tensor ${t.name} is listed in ${weightMap.get(t.name)} by the index`);
        }
        found.set(t.name, { ...t, file });
      }
    }
    if (weightMap) {
      for (const [name, shard] of weightMap) {
        if (!found.has(name)) throw new ModelFormatError(join(dir, shard), `missing tensor ${name} (listed in the index)`);
      }
    }
    const where = weightMap ? indexPath : files[0]!.path;
    const tensors = validate(config, found, where, "config.json");
    return { path: dir, format: "safetensors", config, ropeLayout: RopeLayout.Half, tensors, files, close: closer(files) };
  });
}

function loadGGUF(path: string, mapFile: MapFile): LoadedModel {
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
      const name = hfNameFromGGUF(t.name);
      if (name) found.set(name, { name, dtype: t.dtype, shape: [...t.dims].reverse(), file, offset: t.offset, bytes: t.bytes });
    }
    const tensors = validate(config, found, path, "GGUF metadata");
    // llama.cpp's converters permute q/k rows for the adjacent-pair RoPE of its llama
    // graph; qwen2 GGUFs keep the HF rows and rotate halves (NEOX).
    const ropeLayout = config.arch === "qwen2" ? RopeLayout.Half : RopeLayout.Interleaved;
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
  const tensors = new Map<string, TensorRef>();
  for (const want of expectedTensors(config)) {
    const t = found.get(want.name);
    if (!t) throw new ModelFormatError(where, `missing tensor ${want.name}`);
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

/** Maps a file after checking it is there and not empty (mmap refuses empty files). */
function mapChecked(path: string, mapFile: MapFile): MappedFile {
  if (!existsSync(path)) throw new ModelFormatError(path, "no such file or directory");
  if (statSync(path).size === 0) throw new ModelFormatError(path, "empty file (0 bytes)");
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

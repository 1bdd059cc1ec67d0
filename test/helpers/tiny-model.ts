// Writes seeded random tiny LLaMA-family models as an HF directory (config.json +
// safetensors, optionally sharded) or a GGUF file, and returns the exact float weights
// the engine will see (after the dtype's rounding or quantize-dequantize round trip),
// in HF layout, for reference forwards. The same seed gives the same weights in every
// format, so an HF dir and a GGUF written from one seed are the same model.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { expectedTensors } from "../../src/model/registry.ts";
import type { HiddenAct, ModelConfig, RopeScaling } from "../../src/model/config.ts";
import { dequantize, encodeTensor, GGML_TYPE, type WriteDType } from "../../src/model/encoding.ts";
import { ggufModelMetadata, writeGGUF, writeSafetensors, type GGUFMetadata, type NamedTensor } from "../../src/model/write.ts";

export type TinyDType = WriteDType;

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
  /** The model family (default LLaMA). StarCoder takes dims.kvHeads = 1 and ignores the
   *  RoPE and bias options. */
  family?: "llama" | "starcoder" | "opt" | "mpt" | "falcon";
  /** Falcon: separate attention and MLP LayerNorms (new_decoder_architecture). */
  twoNorms?: boolean;
  /** MPT: ALiBi's maximum bias (default 8), and clip_qkv. */
  alibiMaxBias?: number;
  clipQkv?: number;
  /** OPT: embedding width (project_in/out when it differs from hidden), and LayerNorm
   *  after the blocks instead of before (which drops the final LayerNorm). */
  wordEmbedProjDim?: number;
  layerNormAfter?: boolean;
  /** Plain-MLP families: the activation (StarCoder default gelu_tanh). */
  hiddenAct?: HiddenAct;
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
  ggufMetadata?: GGUFMetadata;
}

export interface TinyModel {
  /** What to pass to loadModelFiles: the directory (safetensors) or the .gguf file. */
  path: string;
  config: ModelConfig;
  /** HF name -> values in HF layout ([out, in] row-major), exactly as stored. */
  weights: Map<string, Float32Array>;
}

const BOS = 1;
/** Token embeddings and output heads of every family. */
const VOCAB_MATRICES = new Set(["model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight", "transformer.word_embeddings.weight", "lm_head.weight"]);
const EOS = 2;

export function writeTinyModel(dir: string, opts: TinyModelOptions): TinyModel {
  const config = tinyConfig(opts);
  if (opts.ropeFreqFactors && opts.format !== "gguf") throw new Error("ropeFreqFactors exist only in GGUF files");
  const rng = new Rng(opts.seed);
  const source: NamedTensor[] = [];
  for (const t of expectedTensors(config)) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    const values = new Float32Array(count);
    if (t.kind === "norm") for (let i = 0; i < count; i++) values[i] = 1 + 0.1 * rng.normal();
    else if (t.kind === "bias") for (let i = 0; i < count; i++) values[i] = 0.1 * rng.normal();
    else {
      // Embeddings/lm_head at 2/sqrt(hidden) give logits of std ~2 (tied or not);
      // linears at 1/sqrt(in) keep activations near unit scale.
      const isVocab = VOCAB_MATRICES.has(t.name);
      const std = isVocab ? 2 / Math.sqrt(config.hiddenSize) : 1 / Math.sqrt(t.shape[1]!);
      for (let i = 0; i < count; i++) values[i] = std * rng.normal();
    }
    source.push({ name: t.name, shape: t.shape, values });
  }

  mkdirSync(dir, { recursive: true });
  const weights = new Map<string, Float32Array>();
  if (opts.format === "safetensors") {
    for (const t of source) weights.set(t.name, roundTrip(opts.dtype, t.values).stored);
    writeSafetensors(dir, config, source, opts.dtype, opts.shards);
    return { path: dir, config, weights };
  }
  // GGUF keeps 1-D tensors in F32 (as llama.cpp does). For F16/BF16 they hold the value
  // the dtype would store, so both formats of one seed carry identical numbers.
  const quantized = opts.dtype === "Q8_0" || opts.dtype === "Q4_0";
  const written = source.map((t): NamedTensor => {
    const oneD = t.shape.length === 1;
    const stored = oneD && quantized ? t.values : roundTrip(opts.dtype, t.values).stored;
    weights.set(t.name, stored);
    return oneD ? { ...t, values: stored } : t;
  });
  const path = join(dir, "model.gguf");
  writeGGUF(path, config, written, opts.dtype, { ...ggufModelMetadata(config, opts.dtype, "tiny"), ...opts.ggufMetadata });
  return { path, config, weights };
}

function tinyConfig(opts: TinyModelOptions): ModelConfig {
  if (opts.family === "starcoder") return starcoderConfig(opts);
  if (opts.family === "opt") return optConfig(opts);
  if (opts.family === "mpt") return mptConfig(opts);
  if (opts.family === "falcon") return falconConfig(opts);
  return llamaConfig(opts);
}

function falconConfig(opts: TinyModelOptions): ModelConfig {
  return {
    ...llamaConfig({ ...opts, attentionBias: false, ropeScaling: null }),
    arch: "falcon",
    tieWordEmbeddings: opts.tied ?? true,
    hiddenAct: "gelu",
    falcon: { twoNorms: opts.twoNorms ?? false, qkvLayout: "grouped" },
  };
}

function mptConfig(opts: TinyModelOptions): ModelConfig {
  return {
    ...llamaConfig({ ...opts, attentionBias: false, ropeScaling: null }),
    arch: "mpt",
    numKvHeads: opts.dims.heads,
    tieWordEmbeddings: true,
    hiddenAct: "gelu",
    alibiMaxBias: opts.alibiMaxBias ?? 8,
    ...(opts.clipQkv !== undefined ? { clipQkv: opts.clipQkv } : {}),
  };
}

function optConfig(opts: TinyModelOptions): ModelConfig {
  const before = !opts.layerNormAfter;
  return {
    ...llamaConfig({ ...opts, attentionBias: false, ropeScaling: null }),
    arch: "opt",
    numKvHeads: opts.dims.heads,
    rmsNormEps: 1e-5,
    tieWordEmbeddings: opts.tied ?? true,
    attentionBias: true,
    hiddenAct: "relu",
    opt: { wordEmbedProjDim: opts.wordEmbedProjDim ?? opts.dims.hidden, layerNormBefore: before, finalLayerNorm: before },
  };
}

function starcoderConfig(opts: TinyModelOptions): ModelConfig {
  const d = opts.dims;
  if (d.kvHeads !== 1) throw new Error("StarCoder is multi-query: dims.kvHeads must be 1");
  return {
    ...llamaConfig({ ...opts, attentionBias: false, ropeScaling: null }),
    arch: "starcoder",
    tieWordEmbeddings: opts.tied ?? true,
    attentionBias: true,
    hiddenAct: opts.hiddenAct ?? "gelu_tanh",
  };
}

function llamaConfig(opts: TinyModelOptions): ModelConfig {
  const d = opts.dims;
  const headDim = d.headDim ?? d.hidden / d.heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) throw new Error(`head dim ${headDim} must be an even integer`);
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

/** `values` encoded as `dtype`, and what the engine decodes from those bytes. */
function roundTrip(dtype: WriteDType, values: Float32Array): { data: Uint8Array; stored: Float32Array } {
  const data = encodeTensor(dtype, values);
  return { data, stored: dequantize(GGML_TYPE[dtype], data, values.length) };
}

export const quantizeQ8_0 = (values: Float32Array) => roundTrip("Q8_0", values);
export const quantizeQ4_0 = (values: Float32Array) => roundTrip("Q4_0", values);

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

// ModelConfig: one normalized description of a model, built either from a Hugging
// Face config.json or from GGUF metadata, so the forward never looks at either format.
// The LLaMA family's parsers live here; registry.ts picks a family's parser.

import { shown } from "./errors.ts";

/** The LLaMA family's architectures (one forward, llama.ts). */
export type LlamaArch = "llama" | "mistral" | "qwen2";
export type Arch = LlamaArch | "starcoder" | "opt" | "mpt" | "falcon";

/** The MLP's activation (families with a plain, ungated MLP). */
export type HiddenAct = "gelu" | "gelu_tanh" | "relu";

export type Fail = (detail: string) => never;

export type RopeScaling =
  | null
  | { type: "llama3"; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositionEmbeddings: number }
  | { type: "linear"; factor: number };

export interface ModelConfig {
  arch: Arch;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** The epsilon of the model's norms (RMSNorm, or LayerNorm in LayerNorm families). */
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  /** Per-pair frequency divisors (length headDim/2) from a GGUF's `rope_freqs.weight`:
   *  how llama.cpp ships Llama-3 RoPE scaling. Applied on top of ropeScaling. */
  ropeFreqFactors?: Float32Array;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry biases (Qwen2). */
  attentionBias: boolean;
  /** The plain MLP's activation (absent for the gated SiLU MLP of the LLaMA family). */
  hiddenAct?: HiddenAct;
  /** OPT's layout: embeddings of wordEmbedProjDim (projected in and out when it differs
   *  from hiddenSize), LayerNorm before or after each block, an optional final one. */
  opt?: { wordEmbedProjDim: number; layerNormBefore: boolean; finalLayerNorm: boolean };
  /** ALiBi instead of position embeddings (MPT): slopes from this maximum bias. */
  alibiMaxBias?: number;
  /** MPT's clip_qkv: q, k and v clipped to [-clipQkv, clipQkv]. */
  clipQkv?: number;
  /** Falcon: separate LayerNorms for attention and MLP (new_decoder_architecture), and
   *  how the fused QKV rows are laid out: per KV group [q heads.., k, v] (HF) or all q,
   *  then all k, then all v (llama.cpp's converter reorders them so). */
  falcon?: { twoNorms: boolean; qkvLayout: "grouped" | "contiguous" };
  bosTokenId: number | null;
  eosTokenIds: number[];
}

export const LLAMA_HF_ARCHITECTURES: Record<string, LlamaArch> = {
  LlamaForCausalLM: "llama",
  MistralForCausalLM: "mistral",
  Qwen2ForCausalLM: "qwen2",
};

/** HF's defaults for keys that config.json may leave out. */
const HF_DEFAULTS: Record<LlamaArch, { rmsNormEps: number; maxPositionEmbeddings: number }> = {
  llama: { rmsNormEps: 1e-6, maxPositionEmbeddings: 2048 },
  mistral: { rmsNormEps: 1e-6, maxPositionEmbeddings: 4096 * 32 },
  qwen2: { rmsNormEps: 1e-6, maxPositionEmbeddings: 32768 },
};

/** A LLaMA-family config from a parsed config.json whose architecture is `arch`. */
export function llamaConfigFromHF(j: Record<string, unknown>, arch: LlamaArch, fail: Fail): ModelConfig {
  const defaults = HF_DEFAULTS[arch];
  const { int, num } = hfFields(j, fail);

  if (j.hidden_act !== undefined && j.hidden_act !== "silu") fail(`unsupported hidden_act ${shown(j.hidden_act)} (only silu)`);
  if (j.mlp_bias === true) fail("mlp_bias is not supported");
  // Llama/Mistral's attention_bias also adds an o_proj bias, which the forward lacks.
  if (arch !== "qwen2" && j.attention_bias === true) fail("attention_bias (with o_proj bias) is not supported for " + arch);

  const hiddenSize = int("hidden_size");
  const numHeads = int("num_attention_heads");
  const cfg: ModelConfig = {
    arch,
    vocabSize: int("vocab_size"),
    hiddenSize,
    intermediateSize: int("intermediate_size"),
    numLayers: int("num_hidden_layers"),
    numHeads,
    numKvHeads: int("num_key_value_heads", numHeads),
    headDim: int("head_dim", hiddenSize / numHeads),
    rmsNormEps: num("rms_norm_eps", defaults.rmsNormEps),
    ropeTheta: num("rope_theta", 10000),
    ropeScaling: hfRopeScaling(j.rope_scaling, fail),
    maxPositionEmbeddings: int("max_position_embeddings", defaults.maxPositionEmbeddings),
    tieWordEmbeddings: j.tie_word_embeddings === true,
    attentionBias: arch === "qwen2",
    bosTokenId: tokenId(j.bos_token_id, "bos_token_id", fail),
    eosTokenIds: tokenIds(j.eos_token_id, "eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

function hfRopeScaling(raw: unknown, fail: (d: string) => never): RopeScaling {
  if (raw === null || raw === undefined) return null;
  if (typeof raw !== "object") return fail(`rope_scaling must be an object, got ${shown(raw)}`);
  const s = raw as Record<string, unknown>;
  const type = s.rope_type ?? s.type;
  const field = (key: string): number => {
    const v = s[key];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) return fail(`rope_scaling.${key} must be a positive number, got ${shown(v)}`);
    return v;
  };
  switch (type) {
    case "default":
      return null;
    case "linear":
      return { type: "linear", factor: field("factor") };
    case "llama3":
      return {
        type: "llama3",
        factor: field("factor"),
        lowFreqFactor: field("low_freq_factor"),
        highFreqFactor: field("high_freq_factor"),
        originalMaxPositionEmbeddings: field("original_max_position_embeddings"),
      };
    default:
      return fail(`unsupported rope_scaling type ${shown(type)} (supported: linear, llama3)`);
  }
}

/** Readers of config.json keys: positive integers and positive numbers, with defaults. */
export function hfFields(j: Record<string, unknown>, fail: Fail) {
  const int = (key: string, fallback?: number): number => {
    const v = j[key] ?? fallback;
    if (v === undefined) return fail(`missing key ${key}`);
    if (!Number.isSafeInteger(v) || (v as number) <= 0) return fail(`${key} must be a positive integer, got ${shown(v)}`);
    return v as number;
  };
  const num = (key: string, fallback?: number): number => {
    const v = j[key] ?? fallback;
    if (v === undefined) return fail(`missing key ${key}`);
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) return fail(`${key} must be a positive number, got ${shown(v)}`);
    return v;
  };
  return { int, num };
}

/** Readers of `{arch}.*` GGUF keys (floats recovered to the decimal the writer meant). */
export function ggufFields(metadata: Map<string, unknown>, arch: string, fail: Fail) {
  const get = (suffix: string): unknown => metadata.get(`${arch}.${suffix}`);
  const int = (suffix: string, fallback?: number): number => {
    const v = get(suffix) ?? fallback;
    if (v === undefined) return fail(`missing key ${arch}.${suffix}`);
    if (!Number.isSafeInteger(v) || (v as number) <= 0) return fail(`${arch}.${suffix} must be a positive integer, got ${shown(v)}`);
    return v as number;
  };
  const num = (suffix: string, fallback?: number): number => {
    const v = get(suffix) ?? fallback;
    if (v === undefined) return fail(`missing key ${arch}.${suffix}`);
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) return fail(`${arch}.${suffix} must be a positive number, got ${shown(v)}`);
    return shortestF32Decimal(v);
  };
  return { get, int, num };
}

export function tokenId(v: unknown, key: string, fail: (d: string) => never): number | null {
  if (v === null || v === undefined) return null;
  if (!Number.isSafeInteger(v) || (v as number) < 0) return fail(`${key} must be a token id, got ${shown(v)}`);
  return v as number;
}

export function tokenIds(v: unknown, key: string, fail: (d: string) => never): number[] {
  const list = Array.isArray(v) ? v : [v];
  return [...new Set(list.map((x) => tokenId(x, key, fail)).filter((x): x is number => x !== null))];
}

export function checkConsistent(cfg: ModelConfig, fail: (d: string) => never): void {
  if (cfg.numHeads % cfg.numKvHeads !== 0) {
    fail(`${cfg.numHeads} attention heads are not a multiple of ${cfg.numKvHeads} key/value heads`);
  }
  if (!Number.isInteger(cfg.headDim) || cfg.headDim % 2 !== 0) fail(`head dimension ${cfg.headDim} must be an even integer`);
}

/** A LLaMA-family config from GGUF metadata whose general.architecture is `arch`;
 *  `tensorNames` tells whether `output.weight` exists (untied). */
export function llamaConfigFromGGUF(metadata: Map<string, unknown>, tensorNames: Set<string>, arch: LlamaArch, fail: Fail): ModelConfig {
  const { get, int, num } = ggufFields(metadata, arch, fail);

  const hiddenSize = int("embedding_length");
  const numHeads = int("attention.head_count");
  const headDim = int("attention.key_length", (get("rope.dimension_count") as number | undefined) ?? hiddenSize / numHeads);
  const ropeDims = get("rope.dimension_count");
  if (ropeDims !== undefined && ropeDims !== headDim) {
    fail(`${arch}.rope.dimension_count ${shown(ropeDims)} differs from the head dimension ${headDim} (partial rotary is not supported)`);
  }

  const tokens = metadata.get("tokenizer.ggml.tokens");
  const vocabSize = get("vocab_size") ?? (Array.isArray(tokens) ? tokens.length : undefined);
  if (vocabSize === undefined) fail(`missing key ${arch}.vocab_size (and no tokenizer.ggml.tokens to count)`);

  const eos = [metadata.get("tokenizer.ggml.eos_token_id"), metadata.get("tokenizer.ggml.eot_token_id")];
  const cfg: ModelConfig = {
    arch,
    vocabSize: Number.isSafeInteger(vocabSize) && (vocabSize as number) > 0
      ? (vocabSize as number)
      : fail(`${arch}.vocab_size must be a positive integer, got ${shown(vocabSize)}`),
    hiddenSize,
    intermediateSize: int("feed_forward_length"),
    numLayers: int("block_count"),
    numHeads,
    numKvHeads: int("attention.head_count_kv", numHeads),
    headDim,
    rmsNormEps: num("attention.layer_norm_rms_epsilon"),
    ropeTheta: num("rope.freq_base", 10000),
    ropeScaling: ggufRopeScaling(arch, metadata, fail),
    maxPositionEmbeddings: int("context_length"),
    tieWordEmbeddings: !tensorNames.has("output.weight"),
    attentionBias: arch === "qwen2",
    bosTokenId: tokenId(metadata.get("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id", fail),
    eosTokenIds: tokenIds(eos.filter((x) => x !== undefined), "tokenizer.ggml.eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

/** `{arch}.rope.scaling.type` = none | linear | llama3 (the llama3 keys low_freq_factor,
 *  high_freq_factor are this project's; llama.cpp ships a rope_freqs tensor instead). */
function ggufRopeScaling(arch: LlamaArch, metadata: Map<string, unknown>, fail: (d: string) => never): RopeScaling {
  const prefix = `${arch}.rope.scaling.`;
  const type = metadata.get(`${prefix}type`);
  const field = (key: string): number => {
    const v = metadata.get(prefix + key);
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) return fail(`${prefix}${key} must be a positive number, got ${shown(v)}`);
    return shortestF32Decimal(v);
  };
  switch (type) {
    case undefined:
    case "none":
      return null;
    case "linear":
      return { type: "linear", factor: field("factor") };
    case "llama3":
      return {
        type: "llama3",
        factor: field("factor"),
        lowFreqFactor: field("low_freq_factor"),
        highFreqFactor: field("high_freq_factor"),
        originalMaxPositionEmbeddings: field("original_context_length"),
      };
    default:
      return fail(`unsupported ${prefix}type ${shown(type)} (supported: none, linear, llama3)`);
  }
}

/** GGUF stores floats as f32 (1e-5 arrives as 9.99999974e-6); recover the decimal the
 *  writer meant: the shortest one that rounds to the same f32. */
function shortestF32Decimal(v: number): number {
  if (Math.fround(v) !== v) return v; // already a float64 value (e.g. from a FLOAT64 key)
  for (let digits = 1; digits <= 9; digits++) {
    const candidate = Number(v.toPrecision(digits));
    if (Math.fround(candidate) === v) return candidate;
  }
  return v;
}

/** RoPE inverse frequencies for pair j < headDim/2 with the config's scaling folded in;
 *  computed in float64, rounded once to f32. */
export function ropeInvFreq(cfg: ModelConfig): Float32Array {
  const half = cfg.headDim / 2;
  const out = new Float32Array(half);
  const s = cfg.ropeScaling;
  for (let j = 0; j < half; j++) {
    let inv = 1 / Math.pow(cfg.ropeTheta, (2 * j) / cfg.headDim);
    if (cfg.ropeFreqFactors) inv /= cfg.ropeFreqFactors[j]!;
    if (s?.type === "linear") {
      inv /= s.factor;
    } else if (s?.type === "llama3") {
      // Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
      const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
      const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
      const wavelen = (2 * Math.PI) / inv;
      if (wavelen > lowFreqWavelen) {
        inv /= s.factor;
      } else if (wavelen >= highFreqWavelen) {
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        inv = (1 - smooth) * (inv / s.factor) + smooth * inv;
      }
    }
    out[j] = inv;
  }
  return out;
}

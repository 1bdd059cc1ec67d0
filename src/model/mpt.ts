// MPT forward pass, top to bottom:
//
//   x = wte(tokens)                                          no position embeddings: ALiBi
//   for each layer:
//     h = layernorm1(x) ; q | k | v = h Wqkv                 fused, no biases, LayerNorm without bias
//     q, k, v = clip(q, k, v to +-clip_qkv)                  when the config sets clip_qkv
//     write k, v into the paged KV cache
//     x += attention(q, K, V, ALiBi bias -slope_h * distance) Wout
//     h = layernorm2(x) ; x += gelu(h Wup) Wdown             exact (erf) GELU, as HF computes it
//   logits = layernorm_f(x at logitRows) Wwte^T              lm_head tied to wte
//
// Formats: HF MptForCausalLM (config.json + safetensors) and llama.cpp's `mpt` GGUF.

import { Activation, type Backend, type Ptr } from "../backend/backend";
import { nameMap, type ExpectedTensor } from "./arch";
import type { PagedKV, TokenBatch } from "./batch";
import { type Linear, type Matrix, NativeModel } from "./blocks";
import type { DeviceLogits, ForwardOptions } from "./causal-lm";
import { checkConsistent, type Fail, ggufFields, hfFields, type ModelConfig, tokenId, tokenIds } from "./config";
import { shown } from "./errors";
import type { LoadedModel } from "./load";
import type { Family } from "./registry";
import { gguf, type GGUFValue } from "./write";

// ---- config -------------------------------------------------------------------------------

function configFromHF(j: Record<string, unknown>, fail: Fail): ModelConfig {
  const { int, num } = hfFields(j, fail);
  const raw = j.attn_config ?? {};
  if (typeof raw !== "object" || raw === null) return fail(`attn_config must be an object, got ${shown(raw)}`);
  const a = raw as Record<string, unknown>;
  if (a.alibi === false) fail("attn_config.alibi false (learned positions) is not supported");
  if (a.softmax_scale !== undefined && a.softmax_scale !== null) fail(`attn_config.softmax_scale ${shown(a.softmax_scale)} is not supported`);
  const clip = a.clip_qkv ?? undefined;
  if (clip !== undefined && !(typeof clip === "number" && clip > 0)) fail(`attn_config.clip_qkv must be a positive number or null, got ${shown(clip)}`);
  if (a.qk_ln === true) fail("attn_config.qk_ln is not supported");
  if (a.attn_type !== undefined && a.attn_type !== "multihead_attention") fail(`attn_config.attn_type ${shown(a.attn_type)} is not supported`);
  if (j.no_bias === false) fail("no_bias false is not supported");
  if (j.logit_scale !== undefined && j.logit_scale !== null) fail(`logit_scale ${shown(j.logit_scale)} is not supported`);
  const alibiMax = a.alibi_bias_max ?? 8;
  if (typeof alibiMax !== "number" || !(alibiMax > 0)) fail(`attn_config.alibi_bias_max must be a positive number, got ${shown(alibiMax)}`);
  const hiddenSize = int("d_model");
  const numHeads = int("n_heads");
  const cfg: ModelConfig = {
    arch: "mpt",
    vocabSize: int("vocab_size"),
    hiddenSize,
    intermediateSize: ffnSize(hiddenSize, num("expansion_ratio", 4), fail),
    numLayers: int("n_layers"),
    numHeads,
    numKvHeads: numHeads,
    headDim: hiddenSize / numHeads,
    rmsNormEps: num("layer_norm_epsilon", 1e-5),
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: int("max_seq_len"),
    tieWordEmbeddings: true,
    attentionBias: false,
    hiddenAct: "gelu",
    alibiMaxBias: alibiMax as number,
    ...(clip !== undefined ? { clipQkv: clip as number } : {}),
    bosTokenId: tokenId(j.bos_token_id, "bos_token_id", fail),
    eosTokenIds: tokenIds(j.eos_token_id, "eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

function configFromGGUF(metadata: Map<string, unknown>, tensorNames: Set<string>, fail: Fail): ModelConfig {
  const { get, int, num } = ggufFields(metadata, "mpt", fail);
  const hiddenSize = int("embedding_length");
  const numHeads = int("attention.head_count");
  const tokens = metadata.get("tokenizer.ggml.tokens");
  const vocab = get("vocab_size") ?? (Array.isArray(tokens) ? tokens.length : undefined);
  if (!Number.isSafeInteger(vocab) || (vocab as number) <= 0) fail(`mpt.vocab_size must be a positive integer, got ${shown(vocab)}`);
  const numKvHeads = int("attention.head_count_kv", numHeads);
  if (numKvHeads !== numHeads) fail(`mpt.attention.head_count_kv ${numKvHeads}: grouped-query MPT is not supported`);
  const cfg: ModelConfig = {
    arch: "mpt",
    vocabSize: vocab as number,
    hiddenSize,
    intermediateSize: int("feed_forward_length"),
    numLayers: int("block_count"),
    numHeads,
    numKvHeads,
    headDim: hiddenSize / numHeads,
    rmsNormEps: num("attention.layer_norm_epsilon"),
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: int("context_length"),
    tieWordEmbeddings: !tensorNames.has("output.weight"),
    attentionBias: false,
    hiddenAct: "gelu",
    alibiMaxBias: num("attention.max_alibi_bias", 8),
    ...(get("attention.clamp_kqv") !== undefined ? { clipQkv: num("attention.clamp_kqv") } : {}),
    bosTokenId: tokenId(metadata.get("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id", fail),
    eosTokenIds: tokenIds([metadata.get("tokenizer.ggml.eos_token_id")].filter((x) => x !== undefined), "tokenizer.ggml.eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

/** MPT's FFN width: d_model * expansion_ratio (a float in config.json), a whole number. */
function ffnSize(hidden: number, ratio: number, fail: Fail): number {
  const size = hidden * ratio;
  if (!Number.isSafeInteger(size)) fail(`expansion_ratio ${ratio} times d_model ${hidden} is not a whole number`);
  return size;
}

/** MPT's ALiBi slopes: 2^(-maxBias * k / n) for k = 1..n with n the power of two at or
 *  above the head count; for other head counts, the odd k then the even ones. */
export function alibiSlopes(numHeads: number, maxBias: number): Float32Array {
  const n = 2 ** Math.ceil(Math.log2(numHeads));
  const all = Array.from({ length: n }, (_, k) => 2 ** (-(maxBias * (k + 1)) / n));
  const order = n === numHeads ? all : [...all.filter((_, k) => k % 2 === 1), ...all.filter((_, k) => k % 2 === 0)];
  return Float32Array.from(order.slice(0, numHeads));
}

// ---- tensors ------------------------------------------------------------------------------

const layerName = (l: number, rest: string) => `transformer.blocks.${l}.${rest}`;

function tensors(c: ModelConfig): ExpectedTensor[] {
  const d = c.hiddenSize;
  const norm = (name: string): ExpectedTensor => ({ name: `${name}.weight`, shape: [d], kind: "norm" });
  const matrix = (name: string, out: number, inp: number): ExpectedTensor => ({ name: `${name}.weight`, shape: [out, inp], kind: "matrix" });
  const out: ExpectedTensor[] = [matrix("transformer.wte", c.vocabSize, d)];
  for (let l = 0; l < c.numLayers; l++) {
    out.push(
      norm(layerName(l, "norm_1")),
      matrix(layerName(l, "attn.Wqkv"), 3 * d, d),
      matrix(layerName(l, "attn.out_proj"), d, d),
      norm(layerName(l, "norm_2")),
      matrix(layerName(l, "ffn.up_proj"), c.intermediateSize, d),
      matrix(layerName(l, "ffn.down_proj"), d, c.intermediateSize),
    );
  }
  out.push(norm("transformer.norm_f"));
  if (!c.tieWordEmbeddings) out.push(matrix("lm_head", c.vocabSize, d));
  return out;
}

const NAMES = nameMap(
  { token_embd: "transformer.wte", output_norm: "transformer.norm_f", output: "lm_head" },
  "transformer.blocks.",
  { attn_norm: "norm_1", attn_qkv: "attn.Wqkv", attn_output: "attn.out_proj", ffn_norm: "norm_2", ffn_up: "ffn.up_proj", ffn_down: "ffn.down_proj" },
);

function hfConfig(c: ModelConfig): Record<string, unknown> {
  if (!c.tieWordEmbeddings) throw new Error("MPT's HF form always ties lm_head to wte");
  return {
    architectures: ["MptForCausalLM"],
    model_type: "mpt",
    vocab_size: c.vocabSize,
    d_model: c.hiddenSize,
    n_heads: c.numHeads,
    n_layers: c.numLayers,
    expansion_ratio: c.intermediateSize / c.hiddenSize,
    max_seq_len: c.maxPositionEmbeddings,
    no_bias: true,
    layer_norm_epsilon: c.rmsNormEps,
    attn_config: { attn_type: "multihead_attention", alibi: true, alibi_bias_max: c.alibiMaxBias, clip_qkv: c.clipQkv ?? null, qk_ln: false, softmax_scale: null },
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds[0] ?? null,
  };
}

function ggufMetadata(c: ModelConfig): Record<string, GGUFValue> {
  return {
    "mpt.vocab_size": gguf.u32(c.vocabSize),
    "mpt.context_length": gguf.u32(c.maxPositionEmbeddings),
    "mpt.embedding_length": gguf.u32(c.hiddenSize),
    "mpt.feed_forward_length": gguf.u32(c.intermediateSize),
    "mpt.block_count": gguf.u32(c.numLayers),
    "mpt.attention.head_count": gguf.u32(c.numHeads),
    "mpt.attention.layer_norm_epsilon": gguf.f32(c.rmsNormEps),
    "mpt.attention.max_alibi_bias": gguf.f32(c.alibiMaxBias ?? 8),
    ...(c.clipQkv !== undefined ? { "mpt.attention.clamp_kqv": gguf.f32(c.clipQkv) } : {}),
  };
}

// ---- forward ------------------------------------------------------------------------------

interface LayerWeights {
  norm1: Ptr;
  q: Linear;
  k: Linear;
  v: Linear;
  out: Linear;
  norm2: Ptr;
  up: Linear;
  down: Linear;
}

export class MPTModel extends NativeModel {
  private readonly wte: Matrix;
  private readonly layers: LayerWeights[] = [];
  private readonly normF: Ptr;
  private readonly lmHead: Linear;
  private readonly slopes: Ptr;
  private readonly x: Ptr;
  private readonly h: Ptr;
  private readonly q: Ptr;
  private readonly k: Ptr;
  private readonly v: Ptr;
  private readonly attn: Ptr;
  private readonly ff: Ptr;

  constructor(backend: Backend, files: LoadedModel, opts: ForwardOptions = {}) {
    super(backend, files, opts);
    const c = this.config;
    const d = c.hiddenSize;
    this.wte = this.matrix("transformer.wte.weight");
    this.lmHead = { w: c.tieWordEmbeddings ? this.wte : this.matrix("lm_head.weight"), bias: 0 };
    this.normF = this.vectorF32("transformer.norm_f.weight");
    this.slopes = this.constant(alibiSlopes(c.numHeads, c.alibiMaxBias ?? 8));
    for (let l = 0; l < c.numLayers; l++) {
      // Wqkv's rows are q, then k, then v: three row slices.
      const qkv = `${layerName(l, "attn.Wqkv")}.weight`;
      const w = this.matrix(qkv);
      const slice = (from: number): Linear => ({ w: this.rowsOf(w, from, d, qkv), bias: 0 });
      this.layers.push({
        norm1: this.vectorF32(`${layerName(l, "norm_1")}.weight`),
        q: slice(0),
        k: slice(d),
        v: slice(2 * d),
        out: this.linearOf(layerName(l, "attn.out_proj"), false),
        norm2: this.vectorF32(`${layerName(l, "norm_2")}.weight`),
        up: this.linearOf(layerName(l, "ffn.up_proj"), false),
        down: this.linearOf(layerName(l, "ffn.down_proj"), false),
      });
      opts.onProgress?.((l + 1) / c.numLayers);
    }
    const n = this.maxBatchTokens;
    this.x = this.f32(n * d);
    this.h = this.f32(n * d);
    this.q = this.f32(n * d);
    this.k = this.f32(n * d);
    this.v = this.f32(n * d);
    this.attn = this.f32(n * d);
    this.ff = this.f32(n * c.intermediateSize);
  }

  run(batch: TokenBatch, kv: PagedKV): DeviceLogits {
    const c = this.config;
    const b = this.backend;
    const n = batch.n;
    const d = c.hiddenSize;
    const eps = c.rmsNormEps;
    this.uploadBatch(batch, kv);
    b.embedding(this.wte.ptr, this.wte.dtype, this.wte.rows, d, this.tokensDev, n, this.x);

    for (let l = 0; l < c.numLayers; l++) {
      const w = this.layers[l]!;
      b.layernorm(this.x, w.norm1, 0, n, d, eps, this.h);
      this.linear(this.h, n, w.q, this.q);
      this.linear(this.h, n, w.k, this.k);
      this.linear(this.h, n, w.v, this.v);
      if (c.clipQkv !== undefined) for (const p of [this.q, this.k, this.v]) b.clamp(p, n * d, c.clipQkv);
      this.attend(l, batch, kv, this.q, this.k, this.v, this.attn, this.slopes);
      this.linear(this.attn, n, w.out, this.h);
      b.add(this.x, this.h, n * d);

      b.layernorm(this.x, w.norm2, 0, n, d, eps, this.h);
      this.linear(this.h, n, w.up, this.ff);
      b.activation(this.ff, n * c.intermediateSize, Activation.GELU, this.ff);
      this.linear(this.ff, n, w.down, this.h);
      b.add(this.x, this.h, n * d);
    }

    const norm = (h: Ptr, rows: number) => b.layernorm(h, this.normF, 0, rows, d, eps, h);
    return this.logits(batch, this.x, norm, this.lmHead);
  }
}

export const MPT: Family = {
  hfArchitectures: { MptForCausalLM: "mpt", MPTForCausalLM: "mpt" },
  ggufArchs: ["mpt"],
  configFromHF: (j, _arch, fail) => configFromHF(j, fail),
  configFromGGUF: (metadata, names, _arch, fail) => configFromGGUF(metadata, names, fail),
  tensors,
  layerTensor: (l) => `${layerName(l, "norm_1")}.weight`,
  ...NAMES,
  hfConfig,
  ggufMetadata,
  build: (backend, files, opts) => new MPTModel(backend, files, opts),
};

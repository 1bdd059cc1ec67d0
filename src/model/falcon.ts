// Falcon forward pass (parallel attention and MLP), top to bottom:
//
//   x = embed(tokens)
//   for each layer:
//     ha = ln_attn(x), hm = ln_mlp(x)     two LayerNorms (new_decoder_architecture),
//                                         or one: ha = hm = input_layernorm(x)
//     qkv = ha Wqkv ; q, k, v = its rows   fused; multi-query or grouped KV heads
//     q, k = rope(q, k at positions) ; write k, v into the paged KV cache
//     x += attention(q, K, V) Wdense + gelu(hm Wh_to_4h) W4h_to_h
//   logits = ln_f(x at logitRows) Wlm_head                 lm_head tied to embed unless given
//
// Formats: HF FalconForCausalLM (config.json + safetensors; QKV rows grouped per KV head
// as [q heads.., k, v]) and llama.cpp's `falcon` GGUF (its converter reorders them to all
// q, all k, all v). q, k and v are gathered out of the fused product as head-sized rows.

import { Activation, type Backend, DType, type Ptr, RopeLayout } from "../backend/backend";
import { nameMap, type ExpectedTensor } from "./arch";
import type { PagedKV, TokenBatch } from "./batch";
import { type Linear, type Matrix, type Norm, NativeModel } from "./blocks";
import type { DeviceLogits, ForwardOptions } from "./causal-lm";
import { checkConsistent, type Fail, ggufFields, hfFields, type ModelConfig, ropeInvFreq, tokenId, tokenIds } from "./config";
import { shown } from "./errors";
import type { LoadedModel } from "./load";
import type { Family } from "./registry";
import { gguf, type GGUFValue } from "./write";

// ---- config -------------------------------------------------------------------------------

function configFromHF(j: Record<string, unknown>, fail: Fail): ModelConfig {
  const { int, num } = hfFields(j, fail);
  for (const key of ["alibi", "bias"]) if (j[key] === true) fail(`${key} true is not supported`);
  if (j.parallel_attn === false) fail("parallel_attn false is not supported");
  if (j.rope_scaling !== undefined && j.rope_scaling !== null) fail(`rope_scaling ${shown(j.rope_scaling)} is not supported`);
  const act = j.activation ?? "gelu";
  if (act !== "gelu") fail(`unsupported activation ${shown(act)} (Falcon: gelu)`);
  const hiddenSize = int("hidden_size");
  const numHeads = int(j.n_head !== undefined && j.num_attention_heads === undefined ? "n_head" : "num_attention_heads");
  const newArch = j.new_decoder_architecture === true;
  const numKvHeads = newArch ? int("num_kv_heads", numHeads) : j.multi_query === false ? numHeads : 1;
  const twoNorms = newArch && (j.num_ln_in_parallel_attn ?? 2) === 2;
  const cfg: ModelConfig = {
    arch: "falcon",
    vocabSize: int("vocab_size"),
    hiddenSize,
    intermediateSize: int("ffn_hidden_size", 4 * hiddenSize),
    numLayers: int(j.n_layer !== undefined && j.num_hidden_layers === undefined ? "n_layer" : "num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim: hiddenSize / numHeads,
    rmsNormEps: num("layer_norm_epsilon", 1e-5),
    ropeTheta: num("rope_theta", 10000),
    ropeScaling: null,
    maxPositionEmbeddings: int("max_position_embeddings", 2048),
    tieWordEmbeddings: j.tie_word_embeddings !== false,
    attentionBias: false,
    hiddenAct: "gelu",
    falcon: { twoNorms, qkvLayout: "grouped" },
    bosTokenId: tokenId(j.bos_token_id, "bos_token_id", fail),
    eosTokenIds: tokenIds(j.eos_token_id, "eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

function configFromGGUF(metadata: Map<string, unknown>, tensorNames: Set<string>, fail: Fail): ModelConfig {
  const { get, int, num } = ggufFields(metadata, "falcon", fail);
  const hiddenSize = int("embedding_length");
  const numHeads = int("attention.head_count");
  const tokens = metadata.get("tokenizer.ggml.tokens");
  const vocab = get("vocab_size") ?? (Array.isArray(tokens) ? tokens.length : undefined);
  if (!Number.isSafeInteger(vocab) || (vocab as number) <= 0) fail(`falcon.vocab_size must be a positive integer, got ${shown(vocab)}`);
  const cfg: ModelConfig = {
    arch: "falcon",
    vocabSize: vocab as number,
    hiddenSize,
    intermediateSize: int("feed_forward_length", 4 * hiddenSize),
    numLayers: int("block_count"),
    numHeads,
    numKvHeads: int("attention.head_count_kv", 1),
    headDim: hiddenSize / numHeads,
    rmsNormEps: num("attention.layer_norm_epsilon"),
    ropeTheta: num("rope.freq_base", 10000),
    ropeScaling: null,
    maxPositionEmbeddings: int("context_length"),
    tieWordEmbeddings: !tensorNames.has("output.weight"),
    attentionBias: false,
    hiddenAct: "gelu",
    falcon: { twoNorms: tensorNames.has("blk.0.attn_norm_2.weight"), qkvLayout: "contiguous" },
    bosTokenId: tokenId(metadata.get("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id", fail),
    eosTokenIds: tokenIds([metadata.get("tokenizer.ggml.eos_token_id")].filter((x) => x !== undefined), "tokenizer.ggml.eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

// ---- tensors ------------------------------------------------------------------------------

const layerName = (l: number, rest: string) => `transformer.h.${l}.${rest}`;

function tensors(c: ModelConfig): ExpectedTensor[] {
  const d = c.hiddenSize;
  const qkvRows = (c.numHeads + 2 * c.numKvHeads) * c.headDim;
  const norm = (name: string): ExpectedTensor[] => [
    { name: `${name}.weight`, shape: [d], kind: "norm" },
    { name: `${name}.bias`, shape: [d], kind: "bias" },
  ];
  const matrix = (name: string, out: number, inp: number): ExpectedTensor => ({ name: `${name}.weight`, shape: [out, inp], kind: "matrix" });
  const out: ExpectedTensor[] = [matrix("transformer.word_embeddings", c.vocabSize, d)];
  for (let l = 0; l < c.numLayers; l++) {
    out.push(
      ...(c.falcon!.twoNorms ? [...norm(layerName(l, "ln_attn")), ...norm(layerName(l, "ln_mlp"))] : norm(layerName(l, "input_layernorm"))),
      matrix(layerName(l, "self_attention.query_key_value"), qkvRows, d),
      matrix(layerName(l, "self_attention.dense"), d, c.numHeads * c.headDim),
      matrix(layerName(l, "mlp.dense_h_to_4h"), c.intermediateSize, d),
      matrix(layerName(l, "mlp.dense_4h_to_h"), d, c.intermediateSize),
    );
  }
  out.push(...norm("transformer.ln_f"));
  if (!c.tieWordEmbeddings) out.push(matrix("lm_head", c.vocabSize, d));
  return out;
}

// llama.cpp's attn_norm is the MLP's (or the only) norm; attn_norm_2 the attention's.
const NAMES = nameMap(
  { token_embd: "transformer.word_embeddings", output_norm: "transformer.ln_f", output: "lm_head" },
  "transformer.h.",
  {
    attn_norm: "input_layernorm",
    attn_norm_2: "ln_attn",
    attn_qkv: "self_attention.query_key_value",
    attn_output: "self_attention.dense",
    ffn_up: "mlp.dense_h_to_4h",
    ffn_down: "mlp.dense_4h_to_h",
  },
);

function hfNameFromGGUF(name: string, config?: ModelConfig): string | null {
  const hf = NAMES.hfNameFromGGUF(name);
  return hf && config?.falcon?.twoNorms ? hf.replace(".input_layernorm.", ".ln_mlp.") : hf;
}

function ggufNameFromHF(name: string): string | null {
  return NAMES.ggufNameFromHF(name.replace(".ln_mlp.", ".input_layernorm."));
}

/** Row indices (in head-sized rows of one token's fused QKV product) of each q, k and
 *  v head, for a layout. */
export function qkvHeadRows(c: ModelConfig): { q: number[]; k: number[]; v: number[] } {
  const H = c.numHeads;
  const K = c.numKvHeads;
  if (c.falcon!.qkvLayout === "contiguous") {
    return { q: range(H, 0), k: range(K, H), v: range(K, H + K) };
  }
  const r = H / K; // q heads per group; a group is [q.., k, v]
  return {
    q: Array.from({ length: H }, (_, h) => Math.floor(h / r) * (r + 2) + (h % r)),
    k: Array.from({ length: K }, (_, g) => g * (r + 2) + r),
    v: Array.from({ length: K }, (_, g) => g * (r + 2) + r + 1),
  };
}

const range = (n: number, from: number) => Array.from({ length: n }, (_, i) => from + i);

function hfConfig(c: ModelConfig): Record<string, unknown> {
  const newArch = c.falcon!.twoNorms || (c.numKvHeads !== 1 && c.numKvHeads !== c.numHeads);
  return {
    architectures: ["FalconForCausalLM"],
    model_type: "falcon",
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    ffn_hidden_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    new_decoder_architecture: newArch,
    num_kv_heads: c.numKvHeads,
    num_ln_in_parallel_attn: newArch ? (c.falcon!.twoNorms ? 2 : 1) : null,
    multi_query: c.numKvHeads === 1,
    parallel_attn: true,
    alibi: false,
    bias: false,
    layer_norm_epsilon: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    max_position_embeddings: c.maxPositionEmbeddings,
    tie_word_embeddings: c.tieWordEmbeddings,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds[0] ?? null,
  };
}

function ggufMetadata(c: ModelConfig): Record<string, GGUFValue> {
  return {
    "falcon.vocab_size": gguf.u32(c.vocabSize),
    "falcon.context_length": gguf.u32(c.maxPositionEmbeddings),
    "falcon.embedding_length": gguf.u32(c.hiddenSize),
    "falcon.feed_forward_length": gguf.u32(c.intermediateSize),
    "falcon.block_count": gguf.u32(c.numLayers),
    "falcon.attention.head_count": gguf.u32(c.numHeads),
    "falcon.attention.head_count_kv": gguf.u32(c.numKvHeads),
    "falcon.attention.layer_norm_epsilon": gguf.f32(c.rmsNormEps),
    "falcon.rope.freq_base": gguf.f32(c.ropeTheta),
  };
}

/** The converter's reordering of HF's grouped QKV rows into all q, all k, all v. */
function ggufTensor(name: string, values: Float32Array, c: ModelConfig): Float32Array {
  if (!name.endsWith("query_key_value.weight")) return values;
  const rows = qkvHeadRows(c);
  const block = c.headDim * c.hiddenSize; // one head's rows
  const out = new Float32Array(values.length);
  [...rows.q, ...rows.k, ...rows.v].forEach((src, dst) => out.set(values.subarray(src * block, (src + 1) * block), dst * block));
  return out;
}

// ---- forward ------------------------------------------------------------------------------

interface LayerWeights {
  lnAttn: Norm;
  lnMlp: Norm | null;
  qkv: Linear;
  dense: Linear;
  up: Linear;
  down: Linear;
}

export class FalconModel extends NativeModel {
  private readonly embed: Matrix;
  private readonly layers: LayerWeights[] = [];
  private readonly lnF: Norm;
  private readonly lmHead: Linear;
  private readonly invFreq: Ptr;
  private readonly x: Ptr;
  private readonly ha: Ptr;
  private readonly hm: Ptr;
  private readonly qkv: Ptr;
  private readonly q: Ptr;
  private readonly k: Ptr;
  private readonly v: Ptr;
  private readonly attn: Ptr;
  private readonly ff: Ptr;
  private readonly out: Ptr;
  /** Per token, the head rows of q, k and v inside qkv (see qkvHeadRows). */
  private readonly rowsQ: Ptr;
  private readonly rowsK: Ptr;
  private readonly rowsV: Ptr;

  constructor(backend: Backend, files: LoadedModel, opts: ForwardOptions = {}) {
    super(backend, files, opts);
    const c = this.config;
    const d = c.hiddenSize;
    const two = c.falcon!.twoNorms;
    this.embed = this.matrix("transformer.word_embeddings.weight");
    this.lmHead = { w: c.tieWordEmbeddings ? this.embed : this.matrix("lm_head.weight"), bias: 0 };
    this.lnF = this.normOf("transformer.ln_f", true);
    for (let l = 0; l < c.numLayers; l++) {
      this.layers.push({
        lnAttn: this.normOf(layerName(l, two ? "ln_attn" : "input_layernorm"), true),
        lnMlp: two ? this.normOf(layerName(l, "ln_mlp"), true) : null,
        qkv: this.linearOf(layerName(l, "self_attention.query_key_value"), false),
        dense: this.linearOf(layerName(l, "self_attention.dense"), false),
        up: this.linearOf(layerName(l, "mlp.dense_h_to_4h"), false),
        down: this.linearOf(layerName(l, "mlp.dense_4h_to_h"), false),
      });
      opts.onProgress?.((l + 1) / c.numLayers);
    }
    this.invFreq = this.constant(ropeInvFreq(c));
    const n = this.maxBatchTokens;
    const qDim = c.numHeads * c.headDim;
    const kvDim = c.numKvHeads * c.headDim;
    this.x = this.f32(n * d);
    this.ha = this.f32(n * d);
    this.hm = two ? this.f32(n * d) : this.ha;
    this.qkv = this.f32(n * (qDim + 2 * kvDim));
    this.q = this.f32(n * qDim);
    this.k = this.f32(n * kvDim);
    this.v = this.f32(n * kvDim);
    this.attn = this.f32(n * qDim);
    this.ff = this.f32(n * c.intermediateSize);
    this.out = this.f32(n * d);
    const heads = qkvHeadRows(c);
    const perToken = c.numHeads + 2 * c.numKvHeads;
    const index = (rows: number[]) => {
      const ids = new Int32Array(n * rows.length);
      for (let i = 0; i < n; i++) rows.forEach((r, j) => (ids[i * rows.length + j] = i * perToken + r));
      const p = this.f32(ids.length);
      backend.upload(p, ids);
      return p;
    };
    this.rowsQ = index(heads.q);
    this.rowsK = index(heads.k);
    this.rowsV = index(heads.v);
  }

  run(batch: TokenBatch, kv: PagedKV): DeviceLogits {
    const c = this.config;
    const b = this.backend;
    const n = batch.n;
    const d = c.hiddenSize;
    const hd = c.headDim;
    const eps = c.rmsNormEps;
    const rowsIn = n * (c.numHeads + 2 * c.numKvHeads);
    this.uploadBatch(batch, kv);
    b.embedding(this.embed.ptr, this.embed.dtype, this.embed.rows, d, this.tokensDev, n, this.x);

    for (let l = 0; l < c.numLayers; l++) {
      const w = this.layers[l]!;
      b.layernorm(this.x, w.lnAttn.weight, w.lnAttn.bias, n, d, eps, this.ha);
      if (w.lnMlp) b.layernorm(this.x, w.lnMlp.weight, w.lnMlp.bias, n, d, eps, this.hm);
      this.linear(this.ha, n, w.qkv, this.qkv);
      // Head-sized rows out of the fused product (an f32 row gather).
      b.embedding(this.qkv, DType.F32, rowsIn, hd, this.rowsQ, n * c.numHeads, this.q);
      b.embedding(this.qkv, DType.F32, rowsIn, hd, this.rowsK, n * c.numKvHeads, this.k);
      b.embedding(this.qkv, DType.F32, rowsIn, hd, this.rowsV, n * c.numKvHeads, this.v);
      b.rope(this.q, n, c.numHeads, hd, hd, this.positionsDev, this.invFreq, RopeLayout.Half);
      b.rope(this.k, n, c.numKvHeads, hd, hd, this.positionsDev, this.invFreq, RopeLayout.Half);
      this.attend(l, batch, kv, this.q, this.k, this.v, this.attn);
      this.linear(this.attn, n, w.dense, this.out);

      this.linear(this.hm, n, w.up, this.ff);
      b.activation(this.ff, n * c.intermediateSize, Activation.GELU, this.ff);
      this.linear(this.ff, n, w.down, this.ha);
      b.add(this.x, this.out, n * d);
      b.add(this.x, this.ha, n * d);
    }

    const norm = (h: Ptr, rows: number) => b.layernorm(h, this.lnF.weight, this.lnF.bias, rows, d, eps, h);
    return this.logits(batch, this.x, norm, this.lmHead);
  }
}

export const FALCON: Family = {
  hfArchitectures: { FalconForCausalLM: "falcon", RWForCausalLM: "falcon" },
  modelTypes: { falcon: "falcon", RefinedWeb: "falcon", RefinedWebModel: "falcon" },
  ggufArchs: ["falcon"],
  configFromHF: (j, _arch, fail) => configFromHF(j, fail),
  configFromGGUF: (metadata, names, _arch, fail) => configFromGGUF(metadata, names, fail),
  tensors,
  layerTensor: (l) => layerName(l, "self_attention.query_key_value.weight"),
  hfNameFromGGUF,
  ggufNameFromHF,
  hfConfig,
  ggufMetadata,
  ggufTensor,
  build: (backend, files, opts) => new FalconModel(backend, files, opts),
};

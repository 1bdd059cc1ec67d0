// StarCoder / GPTBigCode forward pass, top to bottom:
//
//   x = wte(tokens) + wpe(positions)                       learned absolute positions
//   for each layer:
//     h = layernorm1(x) ; q | k | v = h Wc_attn + b          fused, multi-query: one K/V head
//     write k, v into the paged KV cache
//     x += attention(q, K, V under the batch's ancestor masks) Wc_proj + b
//     h = layernorm2(x) ; x += gelu(h Wc_fc + b) Wc_proj + b
//   logits = layernorm_f(x at logitRows) Wlm_head            lm_head tied to wte unless given
//
// Formats: HF GPTBigCodeForCausalLM (config.json + safetensors) and llama.cpp's
// `starcoder` GGUF (c_attn kept fused as attn_qkv).

import { Activation, type Backend, type Ptr } from "../backend/backend";
import { nameMap, type ExpectedTensor } from "./arch";
import type { PagedKV, TokenBatch } from "./batch";
import { type Linear, type Matrix, type Norm, NativeModel } from "./blocks";
import type { DeviceLogits, ForwardOptions } from "./causal-lm";
import { checkConsistent, type Fail, ggufFields, type HiddenAct, hfFields, type ModelConfig, tokenId, tokenIds } from "./config";
import { shown } from "./errors";
import type { LoadedModel } from "./load";
import type { Family } from "./registry";
import { gguf, type GGUFValue } from "./write";

// ---- config -------------------------------------------------------------------------------

/** HF activation_function values and what they compute. */
const HF_ACTIVATIONS: Record<string, HiddenAct> = {
  gelu_pytorch_tanh: "gelu_tanh",
  gelu_new: "gelu_tanh",
  gelu: "gelu",
};

function configFromHF(j: Record<string, unknown>, fail: Fail): ModelConfig {
  const { int, num } = hfFields(j, fail);
  // Without multi_query, c_attn interleaves q, k, v per head: a layout we do not read.
  if (j.multi_query === false) fail("multi_query false (per-head fused c_attn) is not supported");
  if (j.scale_attn_weights === false) fail("scale_attn_weights false is not supported");
  const act = j.activation_function ?? "gelu_pytorch_tanh";
  if (typeof act !== "string" || !Object.hasOwn(HF_ACTIVATIONS, act)) {
    fail(`unsupported activation_function ${shown(act)} (supported: ${Object.keys(HF_ACTIVATIONS).join(", ")})`);
  }
  const hiddenSize = int("n_embd");
  const numHeads = int("n_head");
  const cfg: ModelConfig = {
    arch: "starcoder",
    vocabSize: int("vocab_size"),
    hiddenSize,
    intermediateSize: int("n_inner", 4 * hiddenSize),
    numLayers: int("n_layer"),
    numHeads,
    numKvHeads: 1,
    headDim: hiddenSize / numHeads,
    rmsNormEps: num("layer_norm_epsilon", 1e-5),
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: int("n_positions"),
    // GPTBigCodeForCausalLM ties lm_head to wte unless told otherwise.
    tieWordEmbeddings: j.tie_word_embeddings !== false,
    attentionBias: true,
    hiddenAct: HF_ACTIVATIONS[act as string],
    bosTokenId: tokenId(j.bos_token_id, "bos_token_id", fail),
    eosTokenIds: tokenIds(j.eos_token_id, "eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

function configFromGGUF(metadata: Map<string, unknown>, tensorNames: Set<string>, fail: Fail): ModelConfig {
  const { get, int, num } = ggufFields(metadata, "starcoder", fail);
  const hiddenSize = int("embedding_length");
  const numHeads = int("attention.head_count");
  const numKvHeads = int("attention.head_count_kv", numHeads);
  if (numKvHeads !== 1) fail(`starcoder.attention.head_count_kv ${numKvHeads}: only multi-query (1) is supported`);
  const tokens = metadata.get("tokenizer.ggml.tokens");
  const vocab = get("vocab_size") ?? (Array.isArray(tokens) ? tokens.length : undefined);
  if (!Number.isSafeInteger(vocab) || (vocab as number) <= 0) fail(`starcoder.vocab_size must be a positive integer, got ${shown(vocab)}`);
  const cfg: ModelConfig = {
    arch: "starcoder",
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
    attentionBias: true,
    // llama.cpp's starcoder graph uses the tanh GELU.
    hiddenAct: "gelu_tanh",
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
  const qkv = d + 2 * c.numKvHeads * c.headDim;
  const linear = (name: string, out: number, inp: number): ExpectedTensor[] => [
    { name: `${name}.weight`, shape: [out, inp], kind: "matrix" },
    { name: `${name}.bias`, shape: [out], kind: "bias" },
  ];
  const norm = (name: string): ExpectedTensor[] => [
    { name: `${name}.weight`, shape: [d], kind: "norm" },
    { name: `${name}.bias`, shape: [d], kind: "bias" },
  ];
  const out: ExpectedTensor[] = [
    { name: "transformer.wte.weight", shape: [c.vocabSize, d], kind: "matrix" },
    { name: "transformer.wpe.weight", shape: [c.maxPositionEmbeddings, d], kind: "matrix" },
  ];
  for (let l = 0; l < c.numLayers; l++) {
    out.push(
      ...norm(layerName(l, "ln_1")),
      ...linear(layerName(l, "attn.c_attn"), qkv, d),
      ...linear(layerName(l, "attn.c_proj"), d, d),
      ...norm(layerName(l, "ln_2")),
      ...linear(layerName(l, "mlp.c_fc"), c.intermediateSize, d),
      ...linear(layerName(l, "mlp.c_proj"), d, c.intermediateSize),
    );
  }
  out.push(...norm("transformer.ln_f"));
  if (!c.tieWordEmbeddings) out.push({ name: "lm_head.weight", shape: [c.vocabSize, d], kind: "matrix" });
  return out;
}

const NAMES = nameMap(
  { token_embd: "transformer.wte", position_embd: "transformer.wpe", output_norm: "transformer.ln_f", output: "lm_head" },
  "transformer.h.",
  { attn_norm: "ln_1", attn_qkv: "attn.c_attn", attn_output: "attn.c_proj", ffn_norm: "ln_2", ffn_up: "mlp.c_fc", ffn_down: "mlp.c_proj" },
);

// ---- writing (tiny test models, conversions) ------------------------------------------------

function hfConfig(c: ModelConfig): Record<string, unknown> {
  return {
    architectures: ["GPTBigCodeForCausalLM"],
    model_type: "gpt_bigcode",
    vocab_size: c.vocabSize,
    n_embd: c.hiddenSize,
    n_inner: c.intermediateSize,
    n_layer: c.numLayers,
    n_head: c.numHeads,
    n_positions: c.maxPositionEmbeddings,
    multi_query: true,
    layer_norm_epsilon: c.rmsNormEps,
    activation_function: c.hiddenAct === "gelu" ? "gelu" : "gelu_pytorch_tanh",
    tie_word_embeddings: c.tieWordEmbeddings,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds[0] ?? null,
  };
}

function ggufMetadata(c: ModelConfig): Record<string, GGUFValue> {
  if (c.hiddenAct !== "gelu_tanh") throw new Error("llama.cpp's starcoder GGUF implies the tanh GELU");
  return {
    "starcoder.vocab_size": gguf.u32(c.vocabSize),
    "starcoder.context_length": gguf.u32(c.maxPositionEmbeddings),
    "starcoder.embedding_length": gguf.u32(c.hiddenSize),
    "starcoder.feed_forward_length": gguf.u32(c.intermediateSize),
    "starcoder.block_count": gguf.u32(c.numLayers),
    "starcoder.attention.head_count": gguf.u32(c.numHeads),
    "starcoder.attention.head_count_kv": gguf.u32(c.numKvHeads),
    "starcoder.attention.layer_norm_epsilon": gguf.f32(c.rmsNormEps),
  };
}

// ---- forward ------------------------------------------------------------------------------

interface LayerWeights {
  ln1: Norm;
  q: Linear;
  k: Linear;
  v: Linear;
  proj: Linear;
  ln2: Norm;
  fc: Linear;
  down: Linear;
}

const ACTIVATIONS: Record<HiddenAct, Activation> = { gelu: Activation.GELU, gelu_tanh: Activation.GELUTanh, relu: Activation.ReLU };

export class StarCoderModel extends NativeModel {
  private readonly wte: Matrix;
  private readonly wpe: Matrix;
  private readonly layers: LayerWeights[] = [];
  private readonly lnF: Norm;
  private readonly lmHead: Linear;
  private readonly act: Activation;
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
    const kvDim = c.numKvHeads * c.headDim;
    this.act = ACTIVATIONS[c.hiddenAct ?? "gelu_tanh"];
    this.wte = this.matrix("transformer.wte.weight");
    this.wpe = this.matrix("transformer.wpe.weight");
    this.lnF = this.normOf("transformer.ln_f", true);
    this.lmHead = { w: c.tieWordEmbeddings ? this.wte : this.matrix("lm_head.weight"), bias: 0 };
    for (let l = 0; l < c.numLayers; l++) {
      // c_attn's rows are q (hidden), then k, then v (one head each): three row slices.
      const qkv = layerName(l, "attn.c_attn");
      const w = this.matrix(`${qkv}.weight`);
      const slice = (from: number, rows: number): Linear => ({
        w: this.rowsOf(w, from, rows, `${qkv}.weight`),
        bias: this.sliceF32(`${qkv}.bias`, from, rows),
      });
      this.layers.push({
        ln1: this.normOf(layerName(l, "ln_1"), true),
        q: slice(0, d),
        k: slice(d, kvDim),
        v: slice(d + kvDim, kvDim),
        proj: this.linearOf(layerName(l, "attn.c_proj"), true),
        ln2: this.normOf(layerName(l, "ln_2"), true),
        fc: this.linearOf(layerName(l, "mlp.c_fc"), true),
        down: this.linearOf(layerName(l, "mlp.c_proj"), true),
      });
      opts.onProgress?.((l + 1) / c.numLayers);
    }
    const n = this.maxBatchTokens;
    this.x = this.f32(n * d);
    this.h = this.f32(n * d);
    this.q = this.f32(n * d);
    this.k = this.f32(n * kvDim);
    this.v = this.f32(n * kvDim);
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
    b.addRows(this.x, this.wpe.ptr, this.wpe.dtype, this.wpe.rows, d, this.positionsDev, n, 0);

    for (let l = 0; l < c.numLayers; l++) {
      const w = this.layers[l]!;
      b.layernorm(this.x, w.ln1.weight, w.ln1.bias, n, d, eps, this.h);
      this.linear(this.h, n, w.q, this.q);
      this.linear(this.h, n, w.k, this.k);
      this.linear(this.h, n, w.v, this.v);
      this.attend(l, batch, kv, this.q, this.k, this.v, this.attn);
      this.linear(this.attn, n, w.proj, this.h);
      b.add(this.x, this.h, n * d);

      b.layernorm(this.x, w.ln2.weight, w.ln2.bias, n, d, eps, this.h);
      this.linear(this.h, n, w.fc, this.ff);
      b.activation(this.ff, n * c.intermediateSize, this.act, this.ff);
      this.linear(this.ff, n, w.down, this.h);
      b.add(this.x, this.h, n * d);
    }

    const norm = (h: Ptr, rows: number) => b.layernorm(h, this.lnF.weight, this.lnF.bias, rows, d, eps, h);
    return this.logits(batch, this.x, norm, this.lmHead);
  }
}

export const STARCODER: Family = {
  hfArchitectures: { GPTBigCodeForCausalLM: "starcoder" },
  modelTypes: { gpt_bigcode: "starcoder" },
  ggufArchs: ["starcoder"],
  configFromHF: (j, _arch, fail) => configFromHF(j, fail),
  configFromGGUF: (metadata, names, _arch, fail) => configFromGGUF(metadata, names, fail),
  tensors,
  layerTensor: (l) => layerName(l, "ln_1.weight"),
  ...NAMES,
  hfConfig,
  ggufMetadata,
  build: (backend, files, opts) => new StarCoderModel(backend, files, opts),
};

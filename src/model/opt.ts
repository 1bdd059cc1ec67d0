// OPT forward pass, top to bottom:
//
//   x = embed(tokens) [Wproject_in] + pos(positions + 2)    learned positions, offset 2
//   for each layer (LayerNorm before the block, or after it per do_layer_norm_before):
//     h = ln_attn(x) ; q, k, v = h Wq + b, h Wk + b, h Wv + b
//     write k, v into the paged KV cache
//     x += attention(q, K, V under the batch's ancestor masks) Wout + b   (then ln_attn if after)
//     h = ln_ffn(x) ; x += relu(h Wfc1 + b) Wfc2 + b                     (then ln_ffn if after)
//   logits = [final_layer_norm](x at logitRows) [Wproject_out] Wlm_head   lm_head tied to embed
//
// Format: HF OPTForCausalLM (config.json + safetensors); llama.cpp has no OPT.

import { Activation, type Backend, type Ptr } from "../backend/backend";
import { nameMap, type ExpectedTensor } from "./arch";
import type { PagedKV, TokenBatch } from "./batch";
import { type Linear, type Matrix, type Norm, NativeModel } from "./blocks";
import type { DeviceLogits, ForwardOptions } from "./causal-lm";
import { checkConsistent, type Fail, hfFields, type ModelConfig, tokenId, tokenIds } from "./config";
import { shown } from "./errors";
import type { LoadedModel } from "./load";
import type { Family } from "./registry";

/** OPT's learned positions start at row 2 (rows 0 and 1 are padding positions). */
const POSITION_OFFSET = 2;

// ---- config -------------------------------------------------------------------------------

function configFromHF(j: Record<string, unknown>, fail: Fail): ModelConfig {
  const { int } = hfFields(j, fail);
  const act = j.activation_function ?? "relu";
  if (act !== "relu") fail(`unsupported activation_function ${shown(act)} (OPT: relu)`);
  if (j.enable_bias === false) fail("enable_bias false is not supported");
  if (j.layer_norm_elementwise_affine === false) fail("layer_norm_elementwise_affine false is not supported");
  const hiddenSize = int("hidden_size");
  const numHeads = int("num_attention_heads");
  const layerNormBefore = j.do_layer_norm_before !== false;
  const cfg: ModelConfig = {
    arch: "opt",
    vocabSize: int("vocab_size"),
    hiddenSize,
    intermediateSize: int("ffn_dim"),
    numLayers: int("num_hidden_layers"),
    numHeads,
    numKvHeads: numHeads,
    headDim: hiddenSize / numHeads,
    // OPT's LayerNorms use PyTorch's default epsilon.
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: int("max_position_embeddings"),
    tieWordEmbeddings: j.tie_word_embeddings !== false,
    attentionBias: true,
    hiddenAct: "relu",
    opt: {
      wordEmbedProjDim: int("word_embed_proj_dim", hiddenSize),
      layerNormBefore,
      finalLayerNorm: layerNormBefore && j._remove_final_layer_norm !== true,
    },
    bosTokenId: tokenId(j.bos_token_id, "bos_token_id", fail),
    eosTokenIds: tokenIds(j.eos_token_id, "eos_token_id", fail),
  };
  checkConsistent(cfg, fail);
  return cfg;
}

// ---- tensors ------------------------------------------------------------------------------

const layerName = (l: number, rest: string) => `model.decoder.layers.${l}.${rest}`;

function tensors(c: ModelConfig): ExpectedTensor[] {
  const d = c.hiddenSize;
  const proj = c.opt!.wordEmbedProjDim;
  const linear = (name: string, out: number, inp: number): ExpectedTensor[] => [
    { name: `${name}.weight`, shape: [out, inp], kind: "matrix" },
    { name: `${name}.bias`, shape: [out], kind: "bias" },
  ];
  const norm = (name: string): ExpectedTensor[] => [
    { name: `${name}.weight`, shape: [d], kind: "norm" },
    { name: `${name}.bias`, shape: [d], kind: "bias" },
  ];
  const out: ExpectedTensor[] = [
    { name: "model.decoder.embed_tokens.weight", shape: [c.vocabSize, proj], kind: "matrix" },
    { name: "model.decoder.embed_positions.weight", shape: [c.maxPositionEmbeddings + POSITION_OFFSET, d], kind: "matrix" },
  ];
  if (proj !== d) {
    out.push(
      { name: "model.decoder.project_in.weight", shape: [d, proj], kind: "matrix" },
      { name: "model.decoder.project_out.weight", shape: [proj, d], kind: "matrix" },
    );
  }
  for (let l = 0; l < c.numLayers; l++) {
    out.push(
      ...norm(layerName(l, "self_attn_layer_norm")),
      ...linear(layerName(l, "self_attn.q_proj"), d, d),
      ...linear(layerName(l, "self_attn.k_proj"), d, d),
      ...linear(layerName(l, "self_attn.v_proj"), d, d),
      ...linear(layerName(l, "self_attn.out_proj"), d, d),
      ...norm(layerName(l, "final_layer_norm")),
      ...linear(layerName(l, "fc1"), c.intermediateSize, d),
      ...linear(layerName(l, "fc2"), d, c.intermediateSize),
    );
  }
  if (c.opt!.finalLayerNorm) out.push(...norm("model.decoder.final_layer_norm"));
  if (!c.tieWordEmbeddings) out.push({ name: "lm_head.weight", shape: [c.vocabSize, proj], kind: "matrix" });
  return out;
}

function hfConfig(c: ModelConfig): Record<string, unknown> {
  return {
    architectures: ["OPTForCausalLM"],
    model_type: "opt",
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    ffn_dim: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    max_position_embeddings: c.maxPositionEmbeddings,
    word_embed_proj_dim: c.opt!.wordEmbedProjDim,
    do_layer_norm_before: c.opt!.layerNormBefore,
    _remove_final_layer_norm: c.opt!.layerNormBefore && !c.opt!.finalLayerNorm,
    activation_function: "relu",
    tie_word_embeddings: c.tieWordEmbeddings,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenIds[0] ?? null,
  };
}

// ---- forward ------------------------------------------------------------------------------

interface LayerWeights {
  lnAttn: Norm;
  q: Linear;
  k: Linear;
  v: Linear;
  out: Linear;
  lnFfn: Norm;
  fc1: Linear;
  fc2: Linear;
}

export class OPTModel extends NativeModel {
  private readonly embed: Matrix;
  private readonly positions: Matrix;
  private readonly projectIn: Linear | null;
  private readonly projectOut: Linear | null;
  private readonly layers: LayerWeights[] = [];
  private readonly finalNorm: Norm | null;
  private readonly lmHead: Linear;
  private readonly before: boolean;
  private readonly x: Ptr;
  private readonly h: Ptr;
  private readonly q: Ptr;
  private readonly k: Ptr;
  private readonly v: Ptr;
  private readonly attn: Ptr;
  private readonly ff: Ptr;
  /** Token embeddings of wordEmbedProjDim before project_in; the head's input after project_out. */
  private readonly narrow: Ptr;

  constructor(backend: Backend, files: LoadedModel, opts: ForwardOptions = {}) {
    super(backend, files, opts);
    const c = this.config;
    const o = c.opt!;
    const d = c.hiddenSize;
    this.before = o.layerNormBefore;
    this.embed = this.matrix("model.decoder.embed_tokens.weight");
    this.positions = this.matrix("model.decoder.embed_positions.weight");
    const projected = o.wordEmbedProjDim !== d;
    this.projectIn = projected ? this.linearOf("model.decoder.project_in", false) : null;
    this.projectOut = projected ? this.linearOf("model.decoder.project_out", false) : null;
    this.finalNorm = o.finalLayerNorm ? this.normOf("model.decoder.final_layer_norm", true) : null;
    this.lmHead = { w: c.tieWordEmbeddings ? this.embed : this.matrix("lm_head.weight"), bias: 0 };
    for (let l = 0; l < c.numLayers; l++) {
      const a = (name: string) => this.linearOf(layerName(l, `self_attn.${name}`), true);
      this.layers.push({
        lnAttn: this.normOf(layerName(l, "self_attn_layer_norm"), true),
        q: a("q_proj"),
        k: a("k_proj"),
        v: a("v_proj"),
        out: a("out_proj"),
        lnFfn: this.normOf(layerName(l, "final_layer_norm"), true),
        fc1: this.linearOf(layerName(l, "fc1"), true),
        fc2: this.linearOf(layerName(l, "fc2"), true),
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
    this.narrow = this.f32(n * o.wordEmbedProjDim);
  }

  run(batch: TokenBatch, kv: PagedKV): DeviceLogits {
    const c = this.config;
    const b = this.backend;
    const n = batch.n;
    const d = c.hiddenSize;
    const eps = c.rmsNormEps;
    const ln = (x: Ptr, norm: Norm, rows: number, y: Ptr) => b.layernorm(x, norm.weight, norm.bias, rows, d, eps, y);
    this.uploadBatch(batch, kv);
    const e = this.embed;
    if (this.projectIn) {
      b.embedding(e.ptr, e.dtype, e.rows, e.cols, this.tokensDev, n, this.narrow);
      this.linear(this.narrow, n, this.projectIn, this.x);
    } else {
      b.embedding(e.ptr, e.dtype, e.rows, d, this.tokensDev, n, this.x);
    }
    b.addRows(this.x, this.positions.ptr, this.positions.dtype, this.positions.rows, d, this.positionsDev, n, POSITION_OFFSET);

    for (let l = 0; l < c.numLayers; l++) {
      const w = this.layers[l]!;
      const attnIn = this.before ? (ln(this.x, w.lnAttn, n, this.h), this.h) : this.x;
      this.linear(attnIn, n, w.q, this.q);
      this.linear(attnIn, n, w.k, this.k);
      this.linear(attnIn, n, w.v, this.v);
      this.attend(l, batch, kv, this.q, this.k, this.v, this.attn);
      this.linear(this.attn, n, w.out, this.h);
      b.add(this.x, this.h, n * d);
      if (!this.before) ln(this.x, w.lnAttn, n, this.x);

      const ffnIn = this.before ? (ln(this.x, w.lnFfn, n, this.h), this.h) : this.x;
      this.linear(ffnIn, n, w.fc1, this.ff);
      b.activation(this.ff, n * c.intermediateSize, Activation.ReLU, this.ff);
      this.linear(this.ff, n, w.fc2, this.h);
      b.add(this.x, this.h, n * d);
      if (!this.before) ln(this.x, w.lnFfn, n, this.x);
    }

    const finish = (h: Ptr, rows: number): Ptr => {
      if (this.finalNorm) ln(h, this.finalNorm, rows, h);
      if (!this.projectOut) return h;
      this.linear(h, rows, this.projectOut, this.narrow);
      return this.narrow;
    };
    return this.logits(batch, this.x, finish, this.lmHead);
  }
}

export const OPT: Family = {
  hfArchitectures: { OPTForCausalLM: "opt" },
  ggufArchs: [],
  configFromHF: (j, _arch, fail) => configFromHF(j, fail),
  tensors,
  layerTensor: (l) => layerName(l, "self_attn_layer_norm.weight"),
  // No GGUF form (llama.cpp has no OPT): no tensor has a GGUF name.
  ...nameMap({}, "model.decoder.layers.", {}),
  hfConfig,
  build: (backend, files, opts) => new OPTModel(backend, files, opts),
};

// The LLaMA family forward pass (Llama 2/3, TinyLlama, Mistral, Qwen2), top to bottom:
//
//   x = embed(tokens)
//   for each layer:
//     h = rmsnorm(x) ; q, k, v = h Wq, h Wk, h Wv (+ biases for Qwen2)
//     q, k = rope(q, k at positions) ; write k, v into the paged KV cache
//     x += attention(q, K, V under the batch's ancestor masks) Wo
//     h = rmsnorm(x) ; x += (silu(h Wgate) * (h Wup)) Wdown
//   logits = rmsnorm(x at logitRows) Wlm_head
//
// Every line is one backend op over preallocated native buffers; nothing is
// allocated per forward. Split over devices (parallel.ts), each rank runs this same
// pass over its shard of heads and neurons (LLAMA_SPLITS), and the two `yield`s are
// where the ranks' partial sums are all-reduced.

import { type Backend, type Ptr, RopeLayout } from "../backend/backend";
import type { PagedKV, TokenBatch } from "./batch";
import { type Linear, type Matrix, NativeModel } from "./blocks";
import type { DeviceLogits, ForwardOptions } from "./causal-lm";
import { ropeInvFreq } from "./config";
import type { LoadedModel } from "./load";
import { runAlone, type ForwardPass, type Placement, type TensorSplits } from "./parallel";

/** Megatron tensor parallelism: Q, K, V and gate/up split by output rows (each rank
 *  its heads and neurons), O and down by input columns (partial sums, all-reduced). */
export const LLAMA_SPLITS: TensorSplits = {
  q_proj: "column",
  k_proj: "column",
  v_proj: "column",
  o_proj: "row",
  gate_proj: "column",
  up_proj: "column",
  down_proj: "row",
};

interface LayerWeights {
  attnNorm: Ptr;
  q: Linear;
  k: Linear;
  v: Linear;
  o: Linear;
  ffnNorm: Ptr;
  gate: Linear;
  up: Linear;
  down: Linear;
}

export class LlamaModel extends NativeModel {
  private readonly embed: Matrix;
  private readonly layers: LayerWeights[];
  private readonly finalNorm: Ptr;
  private readonly lmHead: Linear;
  private readonly invFreq: Ptr;
  private readonly ropeLayout: RopeLayout;
  // Activations, sized for maxBatchTokens.
  private readonly x: Ptr;
  private readonly h: Ptr;
  private readonly q: Ptr;
  private readonly k: Ptr;
  private readonly v: Ptr;
  private readonly attn: Ptr;
  private readonly gate: Ptr;
  private readonly up: Ptr;

  constructor(backend: Backend, files: LoadedModel, opts: ForwardOptions = {}, placement?: Placement) {
    super(backend, files, opts, placement);
    const c = this.config;
    this.ropeLayout = files.ropeLayout;
    this.embed = this.matrix("model.embed_tokens.weight");
    this.lmHead = { w: c.tieWordEmbeddings ? this.embed : this.matrix("lm_head.weight"), bias: 0 };
    this.finalNorm = this.vectorF32("model.norm.weight");
    this.layers = [];
    for (let l = 0; l < c.numLayers; l++) {
      const p = `model.layers.${l}`;
      this.layers.push({
        attnNorm: this.vectorF32(`${p}.input_layernorm.weight`),
        q: this.linearOf(`${p}.self_attn.q_proj`, c.attentionBias),
        k: this.linearOf(`${p}.self_attn.k_proj`, c.attentionBias),
        v: this.linearOf(`${p}.self_attn.v_proj`, c.attentionBias),
        o: this.linearOf(`${p}.self_attn.o_proj`, false),
        ffnNorm: this.vectorF32(`${p}.post_attention_layernorm.weight`),
        gate: this.linearOf(`${p}.mlp.gate_proj`, false),
        up: this.linearOf(`${p}.mlp.up_proj`, false),
        down: this.linearOf(`${p}.mlp.down_proj`, false),
      });
      opts.onProgress?.((l + 1) / c.numLayers);
    }
    this.invFreq = this.constant(ropeInvFreq(c));

    const n = this.maxBatchTokens;
    this.x = this.f32(n * c.hiddenSize);
    this.h = this.f32(n * c.hiddenSize);
    this.q = this.f32(n * c.numHeads * c.headDim);
    this.k = this.f32(n * c.numKvHeads * c.headDim);
    this.v = this.f32(n * c.numKvHeads * c.headDim);
    this.attn = this.f32(n * c.numHeads * c.headDim);
    this.gate = this.f32(n * c.intermediateSize);
    this.up = this.f32(n * c.intermediateSize);
  }

  run(batch: TokenBatch, kv: PagedKV): DeviceLogits {
    return runAlone(this.pass(batch, kv));
  }

  *pass(batch: TokenBatch, kv: PagedKV): ForwardPass {
    const c = this.config;
    const b = this.backend;
    const n = batch.n;
    const dim = c.hiddenSize;
    this.uploadBatch(batch, kv);
    b.embedding(this.embed.ptr, this.embed.dtype, this.embed.rows, dim, this.tokensDev, n, this.x);

    for (let l = 0; l < c.numLayers; l++) {
      const w = this.layers[l]!;
      b.rmsnorm(this.x, w.attnNorm, n, dim, c.rmsNormEps, this.h);
      this.linear(this.h, n, w.q, this.q);
      this.linear(this.h, n, w.k, this.k);
      this.linear(this.h, n, w.v, this.v);
      b.rope(this.q, n, c.numHeads, c.headDim, c.headDim, this.positionsDev, this.invFreq, this.ropeLayout);
      b.rope(this.k, n, c.numKvHeads, c.headDim, c.headDim, this.positionsDev, this.invFreq, this.ropeLayout);
      this.attend(l, batch, kv, this.q, this.k, this.v, this.attn);
      this.linear(this.attn, n, w.o, this.h);
      yield this.partialSum(this.h, n * dim);
      b.add(this.x, this.h, n * dim);

      b.rmsnorm(this.x, w.ffnNorm, n, dim, c.rmsNormEps, this.h);
      this.linear(this.h, n, w.gate, this.gate);
      this.linear(this.h, n, w.up, this.up);
      b.swiglu(this.gate, this.up, n * c.intermediateSize, this.gate);
      this.linear(this.gate, n, w.down, this.h);
      yield this.partialSum(this.h, n * dim);
      b.add(this.x, this.h, n * dim);
    }

    const norm = (h: Ptr, rows: number) => b.rmsnorm(h, this.finalNorm, rows, dim, c.rmsNormEps, h);
    return this.logits(batch, this.x, norm, this.lmHead);
  }
}

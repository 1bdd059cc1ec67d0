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
// allocated per forward.

import { DType, type Backend, type DeviceBuffer, type Ptr, RopeLayout } from "../backend/backend";
import type { PagedKV, TokenBatch } from "./batch";
import { ropeInvFreq, type ModelConfig } from "./config";
import { loadModelFiles, type LoadedModel, type TensorRef } from "./load";

interface Matrix {
  ptr: Ptr;
  dtype: DType;
  rows: number;
  cols: number;
}

interface LayerWeights {
  attnNorm: Ptr;
  wq: Matrix;
  wk: Matrix;
  wv: Matrix;
  wo: Matrix;
  bq: Ptr;
  bk: Ptr;
  bv: Ptr;
  ffnNorm: Ptr;
  wGate: Matrix;
  wUp: Matrix;
  wDown: Matrix;
}

export interface ForwardOptions {
  /** Most tokens one forward may carry (prefill chunk + trees of all sequences). */
  maxBatchTokens?: number;
  /** Most rows of logits one forward may return. */
  maxLogitRows?: number;
  /** Called after each layer's weights are in place (0..1): uploads to a GPU take a while. */
  onProgress?(fraction: number): void;
}

export class LlamaModel {
  readonly config: ModelConfig;
  readonly maxBatchTokens: number;
  readonly maxLogitRows: number;
  readonly maxWords: number;
  private readonly embed: Matrix;
  private readonly layers: LayerWeights[];
  private readonly finalNorm: Ptr;
  private readonly lmHead: Matrix;
  private readonly invFreq: Ptr;
  private readonly ropeLayout: RopeLayout;
  private readonly owned: DeviceBuffer[] = [];
  // Activations and the uploaded batch, sized for maxBatchTokens.
  private readonly x: Ptr;
  private readonly h: Ptr;
  private readonly q: Ptr;
  private readonly k: Ptr;
  private readonly v: Ptr;
  private readonly attn: Ptr;
  private readonly gate: Ptr;
  private readonly up: Ptr;
  private readonly lastHidden: Ptr;
  private readonly logitsBuf: DeviceBuffer;
  private readonly tokensDev: Ptr;
  private readonly positionsDev: Ptr;
  private readonly seqDev: Ptr;
  private readonly slotDev: Ptr;
  private readonly ancestorsDev: Ptr;
  private readonly logitRowsDev: Ptr;
  private readonly logitsHost: Float32Array;

  constructor(readonly backend: Backend, readonly files: LoadedModel, opts: ForwardOptions = {}) {
    const c = files.config;
    this.config = c;
    this.maxBatchTokens = opts.maxBatchTokens ?? 512;
    // Every row may want logits unless that would take more than 64 MB.
    this.maxLogitRows = opts.maxLogitRows ?? Math.max(1, Math.min(this.maxBatchTokens, Math.floor((64 << 20) / (4 * c.vocabSize))));
    // Masks are compacted per batch (BatchBuilder.build), so a generous limit is free:
    // drafters index up to a whole grown tree (2048 nodes) across several forwards.
    this.maxWords = Math.max(64, Math.ceil(this.maxBatchTokens / 32));
    this.ropeLayout = files.ropeLayout;

    this.embed = this.matrix("model.embed_tokens.weight");
    this.lmHead = c.tieWordEmbeddings ? this.embed : this.matrix("lm_head.weight");
    this.finalNorm = this.vectorF32("model.norm.weight");
    this.layers = [];
    for (let l = 0; l < c.numLayers; l++) {
      const p = `model.layers.${l}`;
      this.layers.push({
        attnNorm: this.vectorF32(`${p}.input_layernorm.weight`),
        wq: this.matrix(`${p}.self_attn.q_proj.weight`),
        wk: this.matrix(`${p}.self_attn.k_proj.weight`),
        wv: this.matrix(`${p}.self_attn.v_proj.weight`),
        wo: this.matrix(`${p}.self_attn.o_proj.weight`),
        bq: c.attentionBias ? this.vectorF32(`${p}.self_attn.q_proj.bias`) : 0,
        bk: c.attentionBias ? this.vectorF32(`${p}.self_attn.k_proj.bias`) : 0,
        bv: c.attentionBias ? this.vectorF32(`${p}.self_attn.v_proj.bias`) : 0,
        ffnNorm: this.vectorF32(`${p}.post_attention_layernorm.weight`),
        wGate: this.matrix(`${p}.mlp.gate_proj.weight`),
        wUp: this.matrix(`${p}.mlp.up_proj.weight`),
        wDown: this.matrix(`${p}.mlp.down_proj.weight`),
      });
      opts.onProgress?.((l + 1) / c.numLayers);
    }
    const inv = ropeInvFreq(c);
    this.invFreq = this.own(inv.byteLength).ptr;
    backend.upload(this.invFreq, inv);

    const n = this.maxBatchTokens;
    const f32 = (count: number) => this.own(count * 4).ptr;
    this.x = f32(n * c.hiddenSize);
    this.h = f32(n * c.hiddenSize);
    this.q = f32(n * c.numHeads * c.headDim);
    this.k = f32(n * c.numKvHeads * c.headDim);
    this.v = f32(n * c.numKvHeads * c.headDim);
    this.attn = f32(n * c.numHeads * c.headDim);
    this.gate = f32(n * c.intermediateSize);
    this.up = f32(n * c.intermediateSize);
    this.lastHidden = f32(this.maxLogitRows * c.hiddenSize);
    this.logitsBuf = this.own(this.maxLogitRows * c.vocabSize * 4);
    this.tokensDev = f32(n);
    this.positionsDev = f32(n);
    this.seqDev = f32(n);
    this.slotDev = f32(n);
    this.ancestorsDev = f32(n * this.maxWords);
    this.logitRowsDev = f32(this.maxLogitRows);
    this.logitsHost = this.logitsBuf.host
      ? new Float32Array(this.logitsBuf.host)
      : new Float32Array(this.maxLogitRows * c.vocabSize);
  }

  /** Runs the batch; returns logits [batch.logitRows.length, vocab]. The view is
   *  reused by the next forward: copy what must outlive it. The caller has reserved
   *  every slot the batch writes (kv.reserve). */
  forward(batch: TokenBatch, kv: PagedKV): Float32Array {
    const c = this.config;
    const b = this.backend;
    const n = batch.n;
    const rows = batch.logitRows.length;
    this.checkBatch(batch, kv);

    b.upload(this.tokensDev, batch.tokens.subarray(0, n));
    b.upload(this.positionsDev, batch.positions.subarray(0, n));
    b.upload(this.seqDev, batch.seq.subarray(0, n));
    b.upload(this.slotDev, batch.slot.subarray(0, n));
    b.upload(this.ancestorsDev, batch.ancestors.subarray(0, n * batch.words));
    b.upload(this.logitRowsDev, batch.logitRows);
    kv.syncIndex();

    const dim = c.hiddenSize;
    const kvDim = c.numKvHeads * c.headDim;
    const scale = 1 / Math.sqrt(c.headDim);
    const e = this.embed;
    b.embedding(e.ptr, e.dtype, e.rows, dim, this.tokensDev, n, this.x);

    for (let l = 0; l < c.numLayers; l++) {
      const w = this.layers[l];
      b.rmsnorm(this.x, w.attnNorm, n, dim, c.rmsNormEps, this.h);
      this.linear(this.h, n, w.wq, w.bq, this.q);
      this.linear(this.h, n, w.wk, w.bk, this.k);
      this.linear(this.h, n, w.wv, w.bv, this.v);
      b.rope(this.q, n, c.numHeads, c.headDim, c.headDim, this.positionsDev, this.invFreq, this.ropeLayout);
      b.rope(this.k, n, c.numKvHeads, c.headDim, c.headDim, this.positionsDev, this.invFreq, this.ropeLayout);
      b.kvWrite(this.k, this.v, n, kvDim, this.seqDev, this.slotDev, kv.blockTablesPtr, kv.maxBlocksPerSeq, kv.blockSize, kv.kPlane(l), kv.vPlane(l), kv.dtype);
      b.attention(
        this.q, n, c.numHeads, c.numKvHeads, c.headDim, kv.kPlane(l), kv.vPlane(l), kv.dtype, kv.blockTablesPtr,
        kv.maxBlocksPerSeq, kv.blockSize, this.seqDev, kv.committedPtr, this.ancestorsDev, batch.words, scale, this.attn,
      );
      this.linear(this.attn, n, w.wo, 0, this.h);
      b.add(this.x, this.h, n * dim);

      b.rmsnorm(this.x, w.ffnNorm, n, dim, c.rmsNormEps, this.h);
      this.linear(this.h, n, w.wGate, 0, this.gate);
      this.linear(this.h, n, w.wUp, 0, this.up);
      b.swiglu(this.gate, this.up, n * c.intermediateSize, this.gate);
      this.linear(this.gate, n, w.wDown, 0, this.h);
      b.add(this.x, this.h, n * dim);
    }

    if (rows === 0) return this.logitsHost.subarray(0, 0);
    // Gather the rows that need logits (an f32 "embedding" lookup into x), then the head.
    b.embedding(this.x, DType.F32, n, dim, this.logitRowsDev, rows, this.lastHidden);
    b.rmsnorm(this.lastHidden, this.finalNorm, rows, dim, c.rmsNormEps, this.lastHidden);
    this.linear(this.lastHidden, rows, this.lmHead, 0, this.logitsBuf.ptr);
    const out = this.logitsHost.subarray(0, rows * c.vocabSize);
    if (!this.logitsBuf.host) b.download(out, this.logitsBuf.ptr);
    return out;
  }

  close(): void {
    for (const buf of this.owned) this.backend.free(buf);
    this.owned.length = 0;
    this.files.close();
  }

  private linear(x: Ptr, n: number, w: Matrix, bias: Ptr, y: Ptr): void {
    this.backend.matmul(x, n, w.cols, w.ptr, w.dtype, w.rows, bias, y);
  }

  private checkBatch(batch: TokenBatch, kv: PagedKV): void {
    const n = batch.n;
    if (n < 1 || n > this.maxBatchTokens) throw new Error(`forward: batch of ${n} tokens, this model takes 1..${this.maxBatchTokens}`);
    if (batch.logitRows.length > this.maxLogitRows) throw new Error(`forward: ${batch.logitRows.length} logit rows, at most ${this.maxLogitRows}`);
    if (batch.words > this.maxWords) throw new Error(`forward: ${batch.words}-word ancestor masks, at most ${this.maxWords}`);
    for (let i = 0; i < n; i++) {
      const id = batch.tokens[i];
      if (id < 0 || id >= this.config.vocabSize) throw new Error(`forward: token id ${id} is outside the vocabulary (0..${this.config.vocabSize - 1})`);
      const row = batch.seq[i];
      if (batch.slot[i] >= kv.capacity(row)) throw new Error(`forward: slot ${batch.slot[i]} of sequence row ${row} was not reserved`);
    }
    for (const r of batch.logitRows) if (r < 0 || r >= n) throw new Error(`forward: logit row ${r} outside the batch`);
  }

  private own(bytes: number): DeviceBuffer {
    const buf = this.backend.alloc(bytes);
    this.owned.push(buf);
    return buf;
  }

  private tensor(name: string): TensorRef {
    const t = this.files.tensors.get(name);
    if (!t) throw new Error(`${this.files.path}: missing tensor ${name}`);
    return t;
  }

  private matrix(name: string): Matrix {
    const t = this.tensor(name);
    return { ptr: this.backend.weights(t.file, t.offset, t.bytes), dtype: t.dtype, rows: t.shape[0], cols: t.shape[1] };
  }

  /** Norm weights and biases as f32 device vectors, whatever their stored dtype (one
   *  embedding-row lookup does the conversion). */
  private vectorF32(name: string): Ptr {
    const t = this.tensor(name);
    const len = t.shape[0];
    const src = this.backend.weights(t.file, t.offset, t.bytes);
    if (t.dtype === DType.F32 && this.backend.name === "cpu") return src;
    const out = this.own(len * 4).ptr;
    const zero = this.own(4);
    this.backend.embedding(src, t.dtype, 1, len, zero.ptr, 1, out);
    return out;
  }
}

/** Architectures whose forward is the one above. */
const LLAMA_FAMILY = new Set(["llama", "mistral", "qwen2"]);

/** Maps the files at `path` (HF directory or GGUF) and builds the model on `backend`. */
export function loadLlama(path: string, backend: Backend, opts: ForwardOptions = {}): LlamaModel {
  const files = loadModelFiles(path, (p) => backend.mapFile(p));
  try {
    if (!LLAMA_FAMILY.has(files.config.arch)) throw new Error(`${path}: architecture ${files.config.arch} is not supported (llama, mistral, qwen2 are)`);
    return new LlamaModel(backend, files, opts);
  } catch (e) {
    files.close();
    throw e;
  }
}

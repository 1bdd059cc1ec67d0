// Blocks every architecture's forward shares: weight lookup, the batch's device
// buffers and checks, linear layers, paged attention, and the logits head. A family
// file (llama.ts, starcoder.ts, ...) extends NativeModel and writes its forward from
// these blocks and backend ops, top to bottom.

import { DType, type Backend, type DeviceBuffer, type KVDType, type Ptr } from "../backend/backend";
import { shardProblem, shardShape, type Shard } from "../backend/group";
import type { PagedKV, TokenBatch } from "./batch";
import type { CausalLM, DeviceLogits, ForwardOptions } from "./causal-lm";
import type { ModelConfig } from "./config";
import type { LoadedModel, TensorRef } from "./load";
import { rankConfig, type PartialSum, type Placement } from "./parallel";

export interface Matrix {
  ptr: Ptr;
  dtype: DType;
  rows: number;
  cols: number;
}

/** A linear layer: weight [out, in] and an optional f32 bias (0 = none). */
export interface Linear {
  w: Matrix;
  bias: Ptr;
}

/** LayerNorm weight and bias (bias 0 = none; RMSNorm uses only the weight). */
export interface Norm {
  weight: Ptr;
  bias: Ptr;
}

export abstract class NativeModel implements CausalLM {
  readonly config: ModelConfig;
  readonly maxBatchTokens: number;
  readonly maxLogitRows: number;
  readonly maxWords: number;
  /** Rank 0 of a split model, or an unsplit one: it runs the logits head. */
  protected readonly leader: boolean;
  private readonly owned: DeviceBuffer[] = [];
  private readonly pending: PartialSum = { ptr: 0, count: 0 };
  // The uploaded batch, sized for maxBatchTokens.
  protected readonly tokensDev: Ptr;
  protected readonly positionsDev: Ptr;
  protected readonly seqDev: Ptr;
  protected readonly slotDev: Ptr;
  protected readonly ancestorsDev: Ptr;
  protected readonly logitRowsDev: Ptr;
  private readonly lastHidden: Ptr;
  private readonly logitsBuf: DeviceBuffer | null;
  private readonly logitsHost: Float32Array;

  /** `placement`: this model is one rank of a tensor-parallel split (parallel.ts): its
   *  config counts its own heads and neurons, its split layers hold their shard. */
  constructor(readonly backend: Backend, readonly files: LoadedModel, opts: ForwardOptions = {}, private readonly placement?: Placement) {
    const c = placement ? rankConfig(files.config, placement.group.tensorParallel) : files.config;
    this.config = c;
    this.leader = (placement?.rank ?? 0) === 0;
    this.maxBatchTokens = opts.maxBatchTokens ?? 512;
    // Every row may want logits unless that would take more than 64 MB.
    this.maxLogitRows = opts.maxLogitRows ?? Math.max(1, Math.min(this.maxBatchTokens, Math.floor((64 << 20) / (4 * c.vocabSize))));
    // Masks are compacted per batch (BatchBuilder.build), so a generous limit is free:
    // drafters index up to a whole grown tree (2048 nodes) across several forwards.
    this.maxWords = Math.max(64, Math.ceil(this.maxBatchTokens / 32));
    const n = this.maxBatchTokens;
    this.tokensDev = this.f32(n);
    this.positionsDev = this.f32(n);
    this.seqDev = this.f32(n);
    this.slotDev = this.f32(n);
    this.ancestorsDev = this.f32(n * this.maxWords);
    this.logitRowsDev = this.f32(this.maxLogitRows);
    this.lastHidden = this.leader ? this.f32(this.maxLogitRows * c.hiddenSize) : 0;
    this.logitsBuf = this.leader ? this.own(this.maxLogitRows * c.vocabSize * 4) : null;
    this.logitsHost = this.logitsBuf?.host
      ? new Float32Array(this.logitsBuf.host)
      : new Float32Array(this.leader ? this.maxLogitRows * c.vocabSize : 0);
  }

  abstract run(batch: TokenBatch, kv: PagedKV): DeviceLogits;

  forward(batch: TokenBatch, kv: PagedKV): Float32Array {
    return this.run(batch, kv).host();
  }

  close(): void {
    for (const buf of this.owned) this.backend.free(buf);
    this.owned.length = 0;
    this.placement?.group.releaseWeights(this.files.files, this.placement.rank);
    this.files.close();
  }

  /** Checks the batch against the limits and the cache, then uploads it. */
  protected uploadBatch(batch: TokenBatch, kv: PagedKV): void {
    this.checkBatch(batch, kv);
    const b = this.backend;
    const n = batch.n;
    b.upload(this.tokensDev, batch.tokens.subarray(0, n));
    b.upload(this.positionsDev, batch.positions.subarray(0, n));
    b.upload(this.seqDev, batch.seq.subarray(0, n));
    b.upload(this.slotDev, batch.slot.subarray(0, n));
    b.upload(this.ancestorsDev, batch.ancestors.subarray(0, n * batch.words));
    b.upload(this.logitRowsDev, batch.logitRows);
    kv.syncIndex();
  }

  /** The all-reduce point after a row-parallel layer: a forward pass yields it (a no-op
   *  unsplit; parallel.ts sums it over the ranks before resuming the pass, so one
   *  object serves every point). */
  protected partialSum(ptr: Ptr, count: number): PartialSum {
    this.pending.ptr = ptr;
    this.pending.count = count;
    return this.pending;
  }

  protected linear(x: Ptr, n: number, l: Linear, y: Ptr): void {
    this.backend.matmul(x, n, l.w.cols, l.w.ptr, l.w.dtype, l.w.rows, l.bias, y);
  }

  /** Writes this layer's K/V rows into the cache, then attends: out = attention(q),
   *  with ALiBi when per-head slopes are given. */
  protected attend(
    layer: number, batch: TokenBatch, kv: PagedKV, q: Ptr, k: Ptr, v: Ptr, out: Ptr, alibiSlopes: Ptr = 0,
  ): void {
    const c = this.config;
    const kvDim = c.numKvHeads * c.headDim;
    const b = this.backend;
    b.kvWrite(k, v, batch.n, kvDim, this.seqDev, this.slotDev, kv.blockTablesPtr, kv.maxBlocksPerSeq, kv.blockSize, kv.kPlane(layer), kv.vPlane(layer), kv.dtype);
    b.attention(
      q, batch.n, c.numHeads, c.numKvHeads, c.headDim, kv.kPlane(layer), kv.vPlane(layer), kv.dtype as KVDType,
      kv.blockTablesPtr, kv.maxBlocksPerSeq, kv.blockSize, this.seqDev, kv.committedPtr, this.ancestorsDev,
      batch.words, 1 / Math.sqrt(c.headDim), out, alibiSlopes,
    );
  }

  /** Logits of the batch's logit rows of x [n, hidden]: gathers them, applies `finish`
   *  (the final norm, in place on [rows, hidden]; it returns the head's input, which a
   *  final projection may put elsewhere), then the head. */
  protected logits(batch: TokenBatch, x: Ptr, finish: (h: Ptr, rows: number) => Ptr | void, head: Linear): DeviceLogits {
    const rows = this.logitsBuf ? batch.logitRows.length : 0;
    if (rows > 0) {
      const c = this.config;
      // An f32 "embedding" lookup gathers the rows.
      this.backend.embedding(x, DType.F32, batch.n, c.hiddenSize, this.logitRowsDev, rows, this.lastHidden);
      const input = finish(this.lastHidden, rows) ?? this.lastHidden;
      this.linear(input, rows, head, this.logitsBuf!.ptr);
    }
    const view = this.logitsHost.subarray(0, rows * this.config.vocabSize);
    let stale = rows > 0 && !this.logitsBuf!.host;
    return {
      ptr: this.logitsBuf?.ptr ?? 0,
      rows,
      host: () => {
        if (stale) this.backend.download(view, this.logitsBuf!.ptr);
        stale = false;
        return view;
      },
    };
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

  // ---- buffers and weights ----------------------------------------------------------

  protected own(bytes: number): DeviceBuffer {
    const buf = this.backend.alloc(bytes);
    this.owned.push(buf);
    return buf;
  }

  /** A device buffer of `count` f32 (or i32) elements. */
  protected f32(count: number): Ptr {
    return this.own(count * 4).ptr;
  }

  /** Uploads host floats into a new device buffer. */
  protected constant(values: Float32Array): Ptr {
    const p = this.f32(values.length);
    this.backend.upload(p, values);
    return p;
  }

  protected has(name: string): boolean {
    return this.files.tensors.has(name);
  }

  protected tensor(name: string): TensorRef {
    const t = this.files.tensors.get(name);
    if (!t) throw new Error(`${this.files.path}: missing tensor ${name}`);
    return t;
  }

  protected matrix(name: string): Matrix {
    const t = this.tensor(name);
    return { ptr: this.backend.weights(t.file, t.offset, t.bytes), dtype: t.dtype, rows: t.shape[0]!, cols: t.shape[1]! };
  }

  /** Rows [from, from + count) of a matrix (a slice of a fused QKV weight); the slice
   *  starts on a row, so it is whole quantization blocks. */
  protected rowsOf(m: Matrix, from: number, count: number, name: string): Matrix {
    const t = this.tensor(name);
    const rowBytes = t.bytes / m.rows;
    return { ptr: this.backend.weights(t.file, t.offset + from * rowBytes, count * rowBytes), dtype: m.dtype, rows: count, cols: m.cols };
  }

  /** Norm weights and biases as f32 device vectors, whatever their stored dtype (one
   *  embedding-row lookup does the conversion). */
  protected vectorF32(name: string): Ptr {
    return this.sliceF32(name, 0, this.tensor(name).shape[0]!);
  }

  /** Elements [from, from + count) of a 1-D tensor as an f32 device vector. */
  protected sliceF32(name: string, from: number, count: number): Ptr {
    const t = this.tensor(name);
    const elem = t.bytes / t.shape[0]!;
    const src = this.backend.weights(t.file, t.offset + from * elem, count * elem);
    if (t.dtype === DType.F32 && this.backend.name === "cpu") return src;
    const out = this.f32(count);
    const zero = this.own(4);
    this.backend.embedding(src, t.dtype, 1, count, zero.ptr, 1, out);
    return out;
  }

  /** A linear layer; on a rank of a split model, its shard when the family splits it: a
   *  column-parallel bias is sliced with the rows, a row-parallel one is added once (leader). */
  protected linearOf(name: string, withBias: boolean): Linear {
    const split = this.placement?.splits[name.slice(name.lastIndexOf(".") + 1)];
    if (!this.placement || !split) return { w: this.matrix(`${name}.weight`), bias: withBias ? this.vectorF32(`${name}.bias`) : 0 };
    const { group, rank } = this.placement;
    const t = this.tensor(`${name}.weight`);
    const shard: Shard = { split, rank, size: group.tensorParallel, rows: t.shape[0]!, cols: t.shape[1]!, dtype: t.dtype };
    const problem = shardProblem(shard);
    if (problem) throw new Error(`tensor parallelism over ${shard.size} devices: cannot split ${t.name}: ${problem}`);
    const { rows, cols } = shardShape(shard);
    const w: Matrix = { ptr: group.weights(t.file, t.offset, t.bytes, shard), dtype: t.dtype, rows, cols };
    if (!withBias) return { w, bias: 0 };
    if (split === "column") return { w, bias: this.sliceF32(`${name}.bias`, rank * rows, rows) };
    return { w, bias: this.leader ? this.vectorF32(`${name}.bias`) : 0 };
  }

  protected normOf(name: string, withBias: boolean): Norm {
    return { weight: this.vectorF32(`${name}.weight`), bias: withBias ? this.vectorF32(`${name}.bias`) : 0 };
  }
}

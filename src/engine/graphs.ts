// CUDA graphs for the LLM's forward. A step is padded to a shape bucket (tokens, logit
// rows), and the first time a bucket is seen its forward runs as usual (which sizes the
// GPU's scratch for that shape); the second time its kernel launches are captured as a
// graph (cuda/graph.cu), and from then on the step's inputs are uploaded into the same
// device buffers and the graph is replayed: one launch instead of hundreds. The model's
// forward is unchanged: every per-step input lives in buffers the model allocated once,
// and the library checks each replayed op (name, shapes, pointers) against its capture.
// A replay that differs runs again without the graph, and that bucket stays eager.

import type { CausalLM, DeviceLogits } from "../model/causal-lm";
import type { PagedKV, TokenBatch } from "../model/batch";

/** Token counts a step is padded to. 15 | 16 and 32 | 33 are kept apart: the CUDA
 *  matmul changes kernels there, and padding must not move a step across. */
export const TOKEN_BUCKETS = [1, 2, 4, 8, 12, 15, 16, 24, 32, 48, 64, 96, 128] as const;
/** Logit-row counts (0: a prefill chunk that emits nothing). */
export const ROW_BUCKETS = [0, ...TOKEN_BUCKETS] as const;

/** Index of the smallest bucket >= count, or -1 above the last. */
export function bucketIndex(buckets: readonly number[], count: number): number {
  return buckets.findIndex((b) => b >= count);
}

/** `batch` grown to `n` tokens, `rows` logit rows and `words`-word masks. Padding tokens
 *  repeat the last token (same row, slot, position and mask: they rewrite its K/V with
 *  the same values and see what it sees); padding logit rows repeat the last row. */
export function padBatch(batch: TokenBatch, n: number, rows: number, words: number): TokenBatch {
  if (n < batch.n || rows < batch.logitRows.length || words < batch.words) {
    throw new Error(`padBatch: cannot shrink a batch (${batch.n} tokens, ${batch.logitRows.length} rows, ${batch.words} words) to ${n}, ${rows}, ${words}`);
  }
  const last = batch.n - 1;
  const grow = (a: Int32Array) => {
    const out = new Int32Array(n);
    out.set(a.subarray(0, batch.n));
    out.fill(a[last]!, batch.n);
    return out;
  };
  const ancestors = new Uint32Array(n * words);
  for (let i = 0; i < n; i++) {
    const src = Math.min(i, last) * batch.words;
    ancestors.set(batch.ancestors.subarray(src, src + batch.words), i * words);
  }
  const logitRows = new Int32Array(rows);
  logitRows.set(batch.logitRows);
  logitRows.fill(batch.logitRows[batch.logitRows.length - 1] ?? last, batch.logitRows.length);
  return {
    n,
    tokens: grow(batch.tokens),
    positions: grow(batch.positions),
    seq: grow(batch.seq),
    slot: grow(batch.slot),
    words,
    ancestors,
    logitRows,
  };
}

/** A model on one CUDA device. A split model's forward runs collectives on every rank's
 *  stream between kernels, which a region of one rank cannot hold. */
function onOneGpu(llm: CausalLM): boolean {
  return llm.backend.name === "cuda" && (llm.shards?.length ?? 1) <= 1;
}

/** Graph capture and replay of one model's forward passes (on CUDA; elsewhere a plain
 *  forward). */
export class StepGraphs {
  /** Buckets that ran once without a graph (the GPU scratch fits them). */
  private readonly warm = new Set<number>();
  /** Buckets with a captured graph. */
  private readonly captured = new Set<number>();
  /** Buckets whose replay failed: they stay eager. */
  private readonly eager = new Set<number>();
  readonly stats = { eager: 0, captured: 0, replayed: 0 };

  constructor(
    private readonly llm: CausalLM,
    readonly enabled = onOneGpu(llm),
  ) {}

  /** llm.run(batch, kv), through a graph where possible; logits of the batch's own rows. */
  run(batch: TokenBatch, kv: PagedKV): DeviceLogits {
    const key = this.enabled ? this.keyOf(batch) : -1;
    if (key < 0 || this.eager.has(key)) {
      this.stats.eager++;
      return this.llm.run(batch, kv);
    }
    const n = TOKEN_BUCKETS[Math.floor(key / ROW_BUCKETS.length)]!;
    const rows = ROW_BUCKETS[key % ROW_BUCKETS.length]!;
    const padded = padBatch(batch, n, rows, Math.ceil(n / 32));
    // The padded rows come after the batch's own.
    const rowsOwn = batch.logitRows.length;
    const own = (logits: DeviceLogits): DeviceLogits => ({
      ptr: logits.ptr,
      rows: rowsOwn,
      host: () => logits.host().subarray(0, rowsOwn * this.llm.config.vocabSize),
    });
    if (!this.warm.has(key)) {
      this.warm.add(key);
      this.stats.eager++;
      return own(this.llm.run(padded, kv));
    }
    const b = this.llm.backend;
    try {
      b.graphBegin(key);
      const logits = this.llm.run(padded, kv);
      b.graphEnd(1);
      this.stats[this.captured.has(key) ? "replayed" : "captured"]++;
      this.captured.add(key);
      return own(logits);
    } catch {
      // Nothing of the region ran: forget its graph and run the step without one.
      b.graphEnd(0);
      b.graphDrop(key);
      this.eager.add(key);
      this.stats.eager++;
      return own(this.llm.run(padded, kv));
    }
  }

  /** The bucket key of a batch, or -1 when it fits no bucket or the model's limits. */
  private keyOf(batch: TokenBatch): number {
    const t = bucketIndex(TOKEN_BUCKETS, batch.n);
    const r = bucketIndex(ROW_BUCKETS, batch.logitRows.length);
    if (t < 0 || r < 0) return -1;
    const n = TOKEN_BUCKETS[t]!;
    const fits = n <= this.llm.maxBatchTokens && ROW_BUCKETS[r]! <= this.llm.maxLogitRows && batch.words <= Math.ceil(n / 32);
    return fits ? t * ROW_BUCKETS.length + r : -1;
  }
}

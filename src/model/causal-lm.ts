// The one model interface the layers above src/model/ use: a causal language model
// that runs a TokenBatch against a paged KV cache and returns logits. Architectures
// (LLaMA, StarCoder, ...) are behind it; callers get one from loadModel (registry.ts).

import type { Backend } from "../backend/backend";
import type { PagedKV, TokenBatch } from "./batch";
import type { ModelConfig } from "./config";
import type { LoadedModel } from "./load";

export interface ForwardOptions {
  /** Most tokens one forward may carry (prefill chunk + trees of all sequences). */
  maxBatchTokens?: number;
  /** Most rows of logits one forward may return. */
  maxLogitRows?: number;
  /** Called after each layer's weights are in place (0..1): uploads to a GPU take a while. */
  onProgress?(fraction: number): void;
}

export interface CausalLM {
  readonly config: ModelConfig;
  /** Most tokens one forward takes. */
  readonly maxBatchTokens: number;
  /** Most rows of logits one forward returns. */
  readonly maxLogitRows: number;
  /** Most 32-bit words of an ancestor mask row. */
  readonly maxWords: number;
  readonly backend: Backend;
  /** The devices a tensor-parallel model is split over (its KV cache splits by KV heads
   *  over them); absent: `backend` alone. */
  readonly shards?: readonly Backend[];
  readonly files: LoadedModel;
  /** Runs the batch; returns logits [batch.logitRows.length, vocab]. The view is
   *  reused by the next forward: copy what must outlive it. The caller has reserved
   *  every slot the batch writes (kv.reserve). */
  forward(batch: TokenBatch, kv: PagedKV): Float32Array;
  /** Frees the model's buffers and unmaps its files. */
  close(): void;
}

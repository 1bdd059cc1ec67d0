// The one model interface the layers above src/model/ use: a causal language model
// that runs a TokenBatch against a paged KV cache and returns logits. Architectures
// (LLaMA, StarCoder, ...) are behind it; callers get one from loadModel (registry.ts).

import type { Backend, Ptr } from "../backend/backend";
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

/** The logits a forward left on its model's device: `rows` rows of vocabSize floats at
 *  `ptr`, valid until the model's next forward. Consumers on the device (the sampler)
 *  read them there; only what needs them on the host downloads them. */
export interface DeviceLogits {
  readonly ptr: Ptr;
  readonly rows: number;
  /** The rows in host memory: a view on the CPU, one download per forward elsewhere. */
  host(): Float32Array;
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
  /** Runs the batch; the logits of its batch.logitRows stay on the device. The caller
   *  has reserved every slot the batch writes (kv.reserve). */
  run(batch: TokenBatch, kv: PagedKV): DeviceLogits;
  /** run(batch, kv).host(): logits [batch.logitRows.length, vocab] in host memory. The
   *  view is reused by the next forward: copy what must outlive it. */
  forward(batch: TokenBatch, kv: PagedKV): Float32Array;
  /** Frees the model's buffers and unmaps its files. */
  close(): void;
}

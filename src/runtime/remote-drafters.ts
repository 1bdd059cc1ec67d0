// SSMs on a thread of their own (a Worker with its own backend context: CPU threads of
// its own, or a GPU's own stream), so they draft one micro-batch while the engine's LLM
// verifies another. Calls that need an answer block the engine's thread until the
// worker replies on a shared flag; the rest are posted and not waited for. The worker
// handles messages in order, so what the engine posted is done before what it asks.

import { MessageChannel, receiveMessageOnPort, Worker, type MessagePort } from "node:worker_threads";
import type { BackendKind } from "../backend/index";
import type { DraftModels } from "../speculation/drafters";
import type { ExpandedTree } from "../speculation/expand";
import type { Rng } from "../speculation/rng";
import type { SamplingParams } from "../speculation/sampling";
import type { DraftRequest } from "../speculation/ssm";
import type { TreeShape } from "../speculation/tree";
import type { CurvePoint } from "./measure";

export interface DraftWorkerSetup {
  ssms: string[];
  kind: BackendKind;
  /** CUDA: the GPU; CPU: ignored (a context of its own with `threads` threads). */
  device: number;
  threads?: number;
  maxSeqs: number;
  maxSeqLen: number;
  maxGrowth: number;
  /** The LLM's vocabulary: every SSM must share it. */
  vocab: number;
}

export interface WireDraftRequest {
  request: number;
  shape: TreeShape;
  sample: boolean;
  tokens: readonly number[];
  params: SamplingParams;
  rng: number[];
}

export type ToDrafter =
  | { type: "init"; setup: DraftWorkerSetup }
  | { type: "open" | "close"; request: number }
  | { type: "accept"; request: number; tokens: readonly number[] }
  | { type: "draft"; requests: WireDraftRequest[] }
  | { type: "measure"; grid: number[] }
  | { type: "usage" }
  | { type: "shutdown" };

/** Every reply: `error` when the call (or a posted message before it) failed. */
export type FromDrafter = {
  error?: string;
  /** draft: trees [ssm][request], the requests' rng states after drawing, and each
   *  request's tokens in the SSM caches after catch-up. */
  trees?: ExpandedTree[][];
  ms?: number;
  rngs?: number[][];
  committed?: number[];
  points?: CurvePoint[];
  blocks?: number;
};

/** How long a call waits for the worker before giving up on it. */
const REPLY_TIMEOUT_MS = 120_000;

export class RemoteDrafters implements DraftModels {
  readonly concurrent = true;
  readonly count: number;
  readonly maxGrowth: number;
  private readonly worker: Worker;
  private readonly replies: MessagePort;
  /** Bumped by the worker after each reply. */
  private readonly flag = new Int32Array(new SharedArrayBuffer(4));
  private asked = 0;
  private drafting: { rngs: Rng[]; requests: number[] } | null = null;
  /** Per request: tokens in the SSM caches as last reported, plus those accepted since
   *  (an estimate for catchUpTokens: accepted drafts are mostly fed already). */
  private readonly cached = new Map<number, number>();
  private closed = false;

  constructor(setup: DraftWorkerSetup) {
    const { port1, port2 } = new MessageChannel();
    this.replies = port1;
    this.worker = new Worker(new URL("./draft-worker.ts", import.meta.url), { workerData: { port: port2, flag: this.flag }, transferList: [port2] });
    // The engine's own end decides when the process ends, not this thread.
    this.worker.unref();
    this.count = setup.ssms.length;
    this.maxGrowth = setup.maxGrowth;
    try {
      this.call({ type: "init", setup });
    } catch (e) {
      void this.worker.terminate();
      throw e;
    }
  }

  open(request: number): void {
    this.cached.set(request, 0);
    this.post({ type: "open", request });
  }

  close(request: number): void {
    this.cached.delete(request);
    this.post({ type: "close", request });
  }

  closeAll(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.call({ type: "shutdown" });
    } finally {
      void this.worker.terminate();
    }
  }

  accept(request: number, newTokens: readonly number[]): void {
    const c = this.cached.get(request);
    if (c !== undefined) this.cached.set(request, c + Math.max(0, newTokens.length - 1));
    this.post({ type: "accept", request, tokens: [...newTokens] });
  }

  catchUpTokens(request: number, tokens: number): number {
    return Math.max(0, tokens - (this.cached.get(request) ?? 0));
  }

  start(requests: DraftRequest[]): void {
    if (this.drafting) throw new Error("drafters: a draft is already in flight");
    this.post({
      type: "draft",
      requests: requests.map((r) => ({ request: r.request, shape: r.shape, sample: r.sample, tokens: r.tokens, params: r.params, rng: r.rng.state })),
    });
    this.asked++;
    this.drafting = { rngs: requests.map((r) => r.rng), requests: requests.map((r) => r.request) };
  }

  collect(): { trees: ExpandedTree[][]; ms: number } {
    const drafting = this.drafting;
    if (!drafting) throw new Error("drafters: collect without start");
    this.drafting = null;
    const reply = this.reply();
    drafting.rngs.forEach((rng, i) => (rng.state = reply.rngs![i]));
    drafting.requests.forEach((id, i) => {
      if (this.cached.has(id)) this.cached.set(id, reply.committed![i]);
    });
    return { trees: reply.trees!, ms: reply.ms! };
  }

  blocksInUse(): number {
    return this.call({ type: "usage" }).blocks!;
  }

  /** The SSMs' summed forward times over `grid`, measured on their own device. */
  measure(grid: number[]): CurvePoint[] {
    return this.call({ type: "measure", grid }).points!;
  }

  private post(msg: ToDrafter): void {
    if (this.closed) throw new Error("drafters: the draft worker is closed");
    this.worker.postMessage(msg);
  }

  private call(msg: ToDrafter): FromDrafter {
    if (this.drafting) throw new Error("drafters: a call while a draft is in flight");
    this.worker.postMessage(msg);
    this.asked++;
    return this.reply();
  }

  /** Blocks until the worker's reply to the oldest unanswered call. */
  private reply(): FromDrafter {
    const deadline = performance.now() + REPLY_TIMEOUT_MS;
    for (;;) {
      const seen = Atomics.load(this.flag, 0);
      const got = seen >= this.asked ? receiveMessageOnPort(this.replies) : undefined;
      if (got) {
        const reply = got.message as FromDrafter;
        if (reply.error) throw new Error(`draft worker: ${reply.error}`);
        return reply;
      }
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`draft worker: no reply within ${REPLY_TIMEOUT_MS / 1000} s (did it crash?)`);
      // The flag may be bumped before the message can be read: wait briefly then.
      Atomics.wait(this.flag, 0, seen, seen >= this.asked ? 1 : Math.min(left, 1000));
    }
  }
}

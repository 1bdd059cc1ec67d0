// The Engine runs the step loop over many requests at once (continuous batching):
// each step admits waiting requests while KV blocks allow, builds ONE TokenBatch
// that mixes prefill chunks, plain decode tokens and speculative token trees,
// runs the LLM once, verifies, commits the accepted paths and hands out tokens.

import { createKVCache, type KVCache } from "../kv/cache";
import { BatchBuilder } from "../model/batch";
import type { LlamaModel } from "../model/llama";
import { Rng } from "../speculation/rng";
import { greedyToken, isGreedy, processLogits, sample, type SamplingParams } from "../speculation/sampling";
import type { Speculator, StepDraft } from "../speculation/speculator";
import { resolveGenerationConfig, type GenerationConfig } from "./config";
import { RequestStats } from "./stats";

export type FinishReason = "stop" | "length" | "cancelled";

export interface TokenEvent {
  token: number;
  /** The token was proposed by a drafter and accepted by the LLM (UIs colour these). */
  fromDraft: boolean;
}

export interface RequestHooks {
  /** New tokens of this request. Return a number k to keep only the first k of them
   *  and finish the request with "stop" (a stop string was found in their text). */
  onTokens?(events: TokenEvent[]): number | void;
  /** The request ended (finishReason is set). */
  onFinish?(): void;
}

export class Request {
  readonly generated: number[] = [];
  readonly fromDraft: boolean[] = [];
  readonly stats = new RequestStats();
  finishReason: FinishReason | null = null;
  /** LLM KV row while running, -1 otherwise. */
  row = -1;
  readonly rng: Rng;
  readonly params: SamplingParams;
  readonly tokens: number[];

  constructor(
    readonly id: number,
    readonly prompt: readonly number[],
    readonly config: GenerationConfig,
    readonly hooks: RequestHooks,
  ) {
    this.tokens = [...prompt];
    this.rng = new Rng(config.seed);
    this.params = {
      temperature: config.temperature,
      topK: config.topK,
      topP: config.topP,
      minP: config.minP,
      repetitionPenalty: config.repetitionPenalty,
    };
  }

  get done(): boolean {
    return this.finishReason !== null;
  }
}

export interface EngineOptions {
  /** Most tokens per forward pass (prefill chunks + trees of all sequences). */
  maxBatchTokens?: number;
  /** Most requests running at once. */
  maxSeqs?: number;
  /** Token-tree speculation; null runs plain incremental decoding. */
  speculator?: Speculator | null;
  /** Tokens that end every request (the model's EOS ids). */
  eosTokenIds?: number[];
}

export class Engine {
  kv: KVCache;
  readonly maxBatchTokens: number;
  readonly maxSeqs: number;
  private readonly waiting: Request[] = [];
  private readonly running: Request[] = [];
  private readonly eos: Set<number>;
  private nextId = 1;
  /** Counts over every finished request, and their generated tokens. */
  readonly totals = new RequestStats();
  private totalGenerated = 0;
  /** Blocks promised to running requests (prompt + max tokens + one tree each). */
  private promisedBlocks = 0;
  private readonly promised = new Map<Request, number>();

  constructor(
    readonly llm: LlamaModel,
    opts: EngineOptions = {},
  ) {
    this.maxBatchTokens = Math.min(opts.maxBatchTokens ?? llm.maxBatchTokens, llm.maxBatchTokens);
    this.maxSeqs = opts.maxSeqs ?? 8;
    this.eos = new Set(opts.eosTokenIds ?? llm.config.eosTokenIds);
    this.kv = this.createKV(opts.speculator ?? null);
    this.speculator = opts.speculator ?? null;
  }

  private _speculator: Speculator | null = null;

  get speculator(): Speculator | null {
    return this._speculator;
  }

  /** Swaps the speculation setup; only between requests. The KV cache grows when a
   *  bigger tree needs more uncommitted slots per sequence. */
  set speculator(s: Speculator | null) {
    if (!this.idle) throw new Error("engine: speculation can only change while no request runs");
    this._speculator?.closeAll();
    this._speculator = s;
    if (this.kv.maxBlocksPerSeq * this.kv.blockSize < this.contextLength + this.treeReserve) {
      this.kv.close();
      this.kv = this.createKV(s);
    }
  }

  private createKV(s: Speculator | null): KVCache {
    return createKVCache(this.llm, { maxSeqs: this.maxSeqs, maxSeqLen: this.contextLength + 1 + (s?.maxNodes ?? 0) });
  }

  /** Longest prompt + generation a request may have. */
  get contextLength(): number {
    return this.llm.config.maxPositionEmbeddings;
  }

  /** Uncommitted slots a step may add beyond the context (root + tree nodes). */
  private get treeReserve(): number {
    return 1 + (this.speculator?.maxNodes ?? 0);
  }

  get idle(): boolean {
    return this.waiting.length === 0 && this.running.length === 0;
  }

  submit(prompt: readonly number[], config: Partial<GenerationConfig> = {}, hooks: RequestHooks = {}): Request {
    const cfg = resolveGenerationConfig(config);
    if (prompt.length === 0) throw new Error("prompt is empty: at least one token (e.g. BOS) is needed");
    if (prompt.length >= this.contextLength) {
      throw new Error(`prompt has ${prompt.length} tokens; the model's context is ${this.contextLength}`);
    }
    const vocab = this.llm.config.vocabSize;
    for (const t of prompt) if (!Number.isInteger(t) || t < 0 || t >= vocab) throw new Error(`prompt token id ${t} is outside the vocabulary (0..${vocab - 1})`);
    const req = new Request(this.nextId++, prompt, cfg, hooks);
    if (cfg.maxNewTokens === 0) this.finish(req, "length");
    else this.waiting.push(req);
    return req;
  }

  cancel(req: Request): void {
    if (req.done) return;
    const w = this.waiting.indexOf(req);
    if (w >= 0) this.waiting.splice(w, 1);
    this.finish(req, "cancelled");
  }

  /** Steps until `req` (or, without one, every request) is done. */
  runUntilDone(req?: Request): void {
    while (req ? !req.done : !this.idle) this.step();
  }

  /** One forward pass of the LLM over every running request. */
  step(): void {
    this.admit();
    if (this.running.length === 0) return;

    // Sequences whose prompt is in the cache decode (with a tree when speculating),
    // as many as fit a forward at their largest tree; the others prefill a chunk from
    // the remaining token budget.
    const treeRows = 1 + (this.speculator?.maxNodes ?? 0);
    const decoding: Request[] = [];
    const prefilling: Request[] = [];
    for (const r of this.running) {
      if (this.kv.committed(r.row) < r.tokens.length - 1) prefilling.push(r);
      else if ((decoding.length + 1) * treeRows <= Math.min(this.maxBatchTokens, this.llm.maxLogitRows)) decoding.push(r);
    }
    const t0 = performance.now();
    const drafts: (StepDraft | null)[] = this.speculator && decoding.length > 0
      ? this.speculator.draft(decoding.map((r) => ({ request: r.id, tokens: r.tokens, params: r.params, rng: r.rng })))
      : decoding.map(() => null);
    const draftMs = performance.now() - t0;

    let budget = this.maxBatchTokens;
    const plan: { req: Request; draft: StepDraft | null; firstLogit: number; logits: number; chain: number }[] = [];
    const builder = new BatchBuilder(this.llm.maxWords);
    let logitRows = 0;
    for (let i = 0; i < decoding.length; i++) {
      const req = decoding[i];
      const draft = drafts[i];
      const size = 1 + (draft?.size ?? 0);
      budget -= size;
      const committed = this.kv.committed(req.row);
      this.kv.reserve(req.row, size);
      const root = req.tokens[req.tokens.length - 1];
      if (draft) draft.linearize(builder, req.row, committed, root, req.tokens.length - 1);
      else builder.add(req.row, committed, root, req.tokens.length - 1, -1, true);
      plan.push({ req, draft, firstLogit: logitRows, logits: size, chain: 0 });
      logitRows += size;
    }
    for (const req of prefilling) {
      if (budget <= 0 || logitRows >= this.llm.maxLogitRows) break;
      const committed = this.kv.committed(req.row);
      const remaining = req.tokens.length - committed;
      const chunk = Math.min(remaining, budget);
      if (chunk <= 0) continue;
      budget -= chunk;
      const last = chunk === remaining;
      this.kv.reserve(req.row, chunk);
      builder.addChain(req.row, committed, req.tokens.slice(committed, committed + chunk), committed, last ? "last" : "none");
      plan.push({ req, draft: null, firstLogit: logitRows, logits: last ? 1 : 0, chain: chunk });
      if (last) logitRows += 1;
    }
    if (plan.length === 0) throw new Error("engine: no request fits in one batch (maxBatchTokens too small?)");

    const batch = builder.build();
    const t1 = performance.now();
    const logits = this.llm.forward(batch, this.kv);
    const forwardMs = performance.now() - t1;
    const vocab = this.llm.config.vocabSize;

    for (const p of plan) {
      const req = p.req;
      const committed = this.kv.committed(req.row);
      const rows = logits.subarray(p.firstLogit * vocab, (p.firstLogit + p.logits) * vocab);
      if (p.chain > 0) {
        // Prefill chunk: all of it is committed; the last chunk also yields a token.
        this.kv.commit(req.row, range(committed, p.chain));
        req.stats.prefill(p.chain, forwardMs);
        if (p.logits === 1) this.emit(req, [{ token: this.pick(req, rows), fromDraft: false }]);
        continue;
      }
      req.stats.step(forwardMs, draftMs / Math.max(1, decoding.length));
      let events: TokenEvent[];
      if (p.draft) {
        const result = p.draft.verify(rows, req.params, req.rng, req.tokens);
        req.stats.speculative(p.draft, result);
        // Root plus the accepted nodes (batch index 1 + node) stay in the cache.
        this.kv.commit(req.row, [committed, ...result.acceptedNodes.map((n) => committed + 1 + n)]);
        events = result.tokens.map((token, k) => ({ token, fromDraft: k < result.acceptedNodes.length }));
      } else {
        this.kv.commit(req.row, [committed]);
        events = [{ token: this.pick(req, rows), fromDraft: false }];
      }
      this.speculator?.accept(req.id, events.map((e) => e.token));
      this.emit(req, events);
    }
    this.running.splice(0, this.running.length, ...this.running.filter((r) => !r.done));
  }

  /** The next token from one row of logits: argmax, or a seeded sample. */
  private pick(req: Request, row: Float32Array): number {
    if (isGreedy(req.params)) return greedyToken(row, req.params, req.tokens);
    return sample(processLogits(row, req.params, req.tokens), req.rng);
  }

  /** Appends tokens until a stop condition, then finishes the request if one hit. */
  private emit(req: Request, events: TokenEvent[]): void {
    let keep = events.length;
    let reason: FinishReason | null = null;
    for (let k = 0; k < events.length; k++) {
      const t = events[k].token;
      const total = req.generated.length + k + 1;
      if ((!req.config.ignoreEos && this.eos.has(t)) || req.config.stopTokenIds.includes(t)) {
        keep = k;
        reason = "stop";
        break;
      }
      if (total >= req.config.maxNewTokens || req.prompt.length + total >= this.contextLength) {
        keep = k + 1;
        reason = "length";
        break;
      }
    }
    let kept = events.slice(0, keep);
    const cut = kept.length > 0 ? req.hooks.onTokens?.(kept) : undefined;
    if (typeof cut === "number") {
      kept = kept.slice(0, cut);
      reason = "stop";
    }
    for (const e of kept) {
      req.generated.push(e.token);
      req.fromDraft.push(e.fromDraft);
      req.tokens.push(e.token);
    }
    if (reason) this.finish(req, reason);
  }

  private admit(): void {
    while (this.waiting.length > 0 && this.running.length < this.maxSeqs) {
      const req = this.waiting[0];
      const need = Math.ceil(Math.min(req.prompt.length + req.config.maxNewTokens + this.treeReserve, this.contextLength + this.treeReserve) / this.kv.blockSize);
      if (need > this.kv.totalBlocks) {
        this.waiting.shift();
        req.finishReason = "length";
        throw new Error(`request ${req.id} needs ${need} KV blocks, the cache has ${this.kv.totalBlocks}`);
      }
      if (this.promisedBlocks + need > this.kv.totalBlocks) break;
      this.waiting.shift();
      req.row = this.kv.openSequence();
      this.promised.set(req, need);
      this.promisedBlocks += need;
      this.speculator?.open(req.id);
      this.running.push(req);
    }
  }

  /** Aggregate statistics over every request finished so far. */
  stats() {
    return this.totals.summary(this.totalGenerated);
  }

  private finish(req: Request, reason: FinishReason): void {
    req.finishReason = reason;
    this.totals.merge(req.stats);
    this.totalGenerated += req.generated.length;
    if (req.row >= 0) {
      this.kv.closeSequence(req.row);
      req.row = -1;
      this.promisedBlocks -= this.promised.get(req) ?? 0;
      this.promised.delete(req);
      this.speculator?.close(req.id);
    }
    const i = this.running.indexOf(req);
    if (i >= 0 && reason === "cancelled") this.running.splice(i, 1);
    req.hooks.onFinish?.();
  }

  close(): void {
    for (const r of [...this.running, ...this.waiting]) this.cancel(r);
    this._speculator?.closeAll();
    this.kv.close();
  }
}

function range(start: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => start + i);
}

// The engine core: one step = schedule (plain-data plan) -> run (one TokenBatch, one
// LLM forward) -> update (verify, commit, detokenise, stop, events). It is synchronous
// and single-threaded; the host (host.ts) runs its step loop off the caller's thread.

import type { DType } from "../backend/backend";
import { createKVCache, type KVCache } from "../kv/cache";
import type { CausalLM } from "../model/causal-lm";
import { NativeSampler, requestRows, type SampleRow, type TreeOutcome, type TreeRows } from "../speculation/sampler";
import { isGreedy, topIndices } from "../speculation/sampling";
import type { PendingDraft, Speculator, StepDraft } from "../speculation/speculator";
import type { TokenTree } from "../speculation/tree";
import { outcome, sampleTree, type VerifyResult } from "../speculation/verify";
import type { Tokenizer } from "../tokenizer/tokenizer";
import { resolveGenerationConfig, type GenerationConfig } from "./config";
import type { CostModel } from "./cost";
import { AcceptanceByDepth, Request, type FinishReason, type SpeculationMode, type TokenLogprob } from "./request";
import { runStep, type StepRun } from "./runner";
import { Scheduler, type DecodeEntry, type DraftEntry, type DraftedEntry, type StepEntry, type StepPlan } from "./scheduler";
import type { StatsSummary } from "./stats";

export type EngineEvent =
  | { type: "tokens"; id: number; text: string; tokens: number[]; fromDraft: boolean[]; logprobs?: TokenLogprob[] }
  | { type: "finish"; id: number; reason: FinishReason; text: string; error?: string; promptTokens: number; stats: StatsSummary };

/** A request the engine refuses (bad prompt, options or speculation setting); `param`
 *  names the field at fault when there is one.
 *  @example
 *  await llm.generate([], {}).catch((e) => e instanceof RequestError && console.log(e.param)); // "prompt"
 */
export class RequestError extends Error {
  constructor(message: string, readonly param?: string) {
    super(message);
    this.name = "RequestError";
  }
}

export interface EngineOptions {
  /** Most requests running at once (SpecInfer's max_requests_per_batch). */
  maxRequestsPerBatch: number;
  /** Most tokens per forward pass (SpecInfer's max_tokens_per_batch). */
  maxTokensPerBatch: number;
  /** Longest prompt + generation (SpecInfer's max_seq_length). */
  maxSeqLength: number;
  kv: KVCache;
  speculator: Speculator | null;
  cost: CostModel | null;
  /** Tokens that end every request (the model's EOS ids). */
  eosTokenIds: number[];
  /** Detokenises and finds stop strings; without one, events carry no text. */
  tokenizer: Tokenizer | null;
}

export interface CreateEngineOptions {
  maxRequestsPerBatch?: number;
  maxTokensPerBatch?: number;
  maxSeqLength?: number;
  speculator?: Speculator | null;
  cost?: CostModel | null;
  tokenizer?: Tokenizer | null;
  eosTokenIds?: number[];
  /** KV pool: a byte budget or a block count; default maxRequestsPerBatch full sequences. */
  kvMemory?: number;
  kvBlocks?: number;
  kvDtype?: DType.F32 | DType.F16;
}

/** An engine over `llm` with its own KV cache, rows long enough for the context plus
 *  the largest tree a step can verify. */
export function createEngine(llm: CausalLM, o: CreateEngineOptions = {}): Engine {
  const maxRequests = o.maxRequestsPerBatch ?? 8;
  const maxSeqLength = Math.min(o.maxSeqLength ?? llm.config.maxPositionEmbeddings, llm.config.maxPositionEmbeddings);
  const speculator = o.speculator ?? null;
  // A row may hold any tree one forward can verify; blocks are taken on demand, so
  // the longer rows cost block-table entries only.
  const treeRows = speculator ? Math.min(llm.maxBatchTokens, llm.maxLogitRows) : 1;
  const kv = createKVCache(llm, { maxSeqs: maxRequests, maxSeqLen: maxSeqLength + treeRows, memoryBytes: o.kvMemory, numBlocks: o.kvBlocks, dtype: o.kvDtype });
  return new Engine(llm, {
    maxRequestsPerBatch: maxRequests,
    maxTokensPerBatch: o.maxTokensPerBatch ?? llm.maxBatchTokens,
    maxSeqLength,
    kv,
    speculator,
    cost: o.cost ?? null,
    eosTokenIds: o.eosTokenIds ?? o.tokenizer?.eosIds ?? llm.config.eosTokenIds,
    tokenizer: o.tokenizer ?? null,
  });
}

export interface EngineStats {
  running: number;
  waiting: number;
  kvBlocksUsed: number;
  kvBlocksTotal: number;
  preemptions: number;
  promptTokens: number;
  generatedTokens: number;
  /** vLLM-shaped speculation counters. */
  numDrafts: number;
  numDraftTokens: number;
  numAcceptedTokens: number;
  acceptedPerPosition: number[];
  /** Steps whose forward ran while the SSMs (on their own device) drafted the next micro-batch. */
  overlappedSteps: number;
  /** Measured forward cost curve (ms per batch size) the auto trees are sized by. */
  costCurve: { tokens: number; ms: number }[];
  /** Tree nodes per decode entry of the last step, and its decode entries. */
  lastStep: { decodes: number; treeNodes: number[] };
}

export class Engine {
  readonly scheduler: Scheduler;
  readonly kv: KVCache;
  readonly speculator: Speculator | null;
  private readonly requests = new Map<number, Request>();
  private readonly eos: Set<number>;
  private nextId = 1;
  private faultNext: string | null = null;
  private closed = false;
  private readonly counters = { promptTokens: 0, generatedTokens: 0, numDrafts: 0, numDraftTokens: 0, numAcceptedTokens: 0, acceptedPerPosition: [] as number[], overlappedSteps: 0 };
  private lastStep: EngineStats["lastStep"] = { decodes: 0, treeNodes: [] };
  /** Picks every step's tokens on the LLM's backend. */
  private readonly sampler: NativeSampler;
  /** SSMs on their own thread: trees drafted during the last step, verified in a later one. */
  private readonly drafted = new Map<Request, DraftedEntry>();

  constructor(readonly llm: CausalLM, private readonly opts: EngineOptions) {
    this.kv = opts.kv;
    this.sampler = new NativeSampler(llm.backend, llm.config.vocabSize);
    this.speculator = opts.speculator;
    this.eos = new Set(opts.eosTokenIds);
    this.scheduler = new Scheduler(opts.kv, opts.speculator, opts.cost, {
      maxRequests: opts.maxRequestsPerBatch,
      maxTokensPerBatch: Math.min(opts.maxTokensPerBatch, llm.maxBatchTokens),
      maxLogitRows: llm.maxLogitRows,
    });
  }

  get contextLength(): number {
    return this.opts.maxSeqLength;
  }

  get idle(): boolean {
    return this.scheduler.idle;
  }

  /** Queues a request; throws RequestError (or ConfigError) when it can never run. */
  submit(prompt: readonly number[], config: Partial<GenerationConfig> = {}, id = this.nextId++): Request {
    const cfg = resolveGenerationConfig(config);
    if (prompt.length === 0) throw new RequestError("prompt is empty: at least one token (e.g. BOS) is needed", "prompt");
    const vocab = this.llm.config.vocabSize;
    for (const t of prompt) {
      if (!Number.isInteger(t) || t < 0 || t >= vocab) throw new RequestError(`prompt token id ${t} is outside the vocabulary (0..${vocab - 1})`, "prompt");
    }
    if (this.requests.has(id)) throw new RequestError(`request id ${id} is already in use`);
    const req = new Request(id, prompt, cfg, this.speculationMode(cfg), new AcceptanceByDepth([...(this.opts.cost?.acceptance.rates ?? [])]), this.opts.tokenizer);
    const rows = this.scheduler.treeRows(req);
    if (prompt.length + rows > this.contextLength) {
      throw new RequestError(`prompt has ${prompt.length} tokens; with one speculative step (${rows} rows) that exceeds the context of ${this.contextLength}`, "prompt");
    }
    if (this.scheduler.admissionBlocks(req) > this.kv.totalBlocks) {
      throw new RequestError(`prompt needs ${this.scheduler.admissionBlocks(req)} KV blocks; the whole cache has ${this.kv.totalBlocks} (raise kvMemory)`, "prompt");
    }
    this.requests.set(id, req);
    if (cfg.maxNewTokens === 0) req.finishReason = "length";
    else this.scheduler.waiting.push(req);
    return req;
  }

  private speculationMode(cfg: GenerationConfig): SpeculationMode {
    const s = cfg.speculation;
    if (s === false || !this.speculator) return { kind: "off" };
    // Auto sizes trees by measured cost. Its trees are verified with one fixed draw per
    // position, so a sampled request's text does not depend on the sizes chosen.
    if (s === "auto" && this.opts.cost && this.speculator.hasModels) return { kind: "auto", ngram: this.speculator.opts.ngram };
    if (s === "auto") return { kind: "fixed", plan: this.speculator.fixedPlan(undefined, undefined) };
    try {
      return { kind: "fixed", plan: this.speculator.fixedPlan(s.tree, s.ngram) };
    } catch (e) {
      throw new RequestError((e as Error).message, "speculation");
    }
  }

  request(id: number): Request | undefined {
    return this.requests.get(id);
  }

  /** Ends a request now and frees its blocks; returns its finish event. */
  cancel(id: number): EngineEvent[] {
    const req = this.requests.get(id);
    if (!req) return [];
    const events: EngineEvent[] = [];
    if (!req.done) req.finishReason = "cancelled";
    this.finish(req, events);
    return events;
  }

  /** Requests finished at submit (maxNewTokens 0) report here. */
  drainFinished(): EngineEvent[] {
    const events: EngineEvent[] = [];
    for (const req of this.requests.values()) if (req.done) this.finish(req, events);
    return events;
  }

  /** Ends every request with an error (a fault the engine cannot pin on one step). */
  failAll(message: string): EngineEvent[] {
    const events: EngineEvent[] = [];
    this.fail([...this.requests.values()], message, events);
    return events;
  }

  /** Test hook: the next step throws with `message` (a fault inside the step). */
  injectFault(message: string): void {
    this.faultNext = message;
  }

  /** One forward pass of the LLM over the scheduled requests. With the SSMs on their
   *  own thread, they draft the next micro-batch's trees during it. */
  step(): EngineEvent[] {
    const events = this.drainFinished();
    const plan = this.scheduler.schedule(this.speculator?.concurrent ? this.drafted : undefined);
    for (const req of plan.preempted) {
      this.drafted.delete(req);
      this.speculator?.close(req.id);
    }
    for (const req of plan.admitted) this.speculator?.open(req.id, req.speculation.kind !== "off");
    for (const req of plan.full) {
      req.finishReason = "length";
      this.finish(req, events);
    }
    for (const entry of plan.entries) this.drafted.delete(entry.req);
    if (plan.entries.length === 0 && plan.toDraft.length === 0) {
      if (!this.idle && plan.admitted.length === 0 && plan.full.length === 0 && this.scheduler.running.length === 0) {
        throw new Error("engine: no request fits in one batch (maxTokensPerBatch too small?)");
      }
      return events;
    }
    let pending: PendingDraft | null = null;
    try {
      if (this.faultNext !== null) {
        const message = this.faultNext;
        this.faultNext = null;
        throw new Error(message);
      }
      if (plan.toDraft.length > 0) {
        pending = this.speculator!.startDraft(plan.toDraft.map(({ req, draft }) => ({ request: req.id, tokens: req.tokens, params: req.params, rng: req.rng, plan: draft })));
      }
      if (plan.entries.length > 0) {
        if (pending) this.counters.overlappedSteps++;
        const run = runStep(this.llm, this.kv, this.speculator, plan.entries);
        this.update(plan, run, events);
      }
    } catch (e) {
      // A failed step fails the requests in it, with its message; the rest go on.
      this.fail(plan.entries.map((e) => e.req), (e as Error)?.message ?? String(e), events);
    }
    if (pending) this.collectDrafts(plan.toDraft, pending, events);
    return events;
  }

  /** Keeps the trees drafted during the step for the step that verifies them; the
   *  cost model learns what drafting took (on the SSMs' own device). */
  private collectDrafts(toDraft: DraftEntry[], pending: PendingDraft, events: EngineEvent[]): void {
    let trees: (StepDraft | null)[];
    try {
      trees = this.speculator!.finishDraft(pending);
    } catch (e) {
      this.fail(toDraft.map((d) => d.req), (e as Error)?.message ?? String(e), events);
      return;
    }
    toDraft.forEach((d, i) => {
      if (this.requests.has(d.req.id)) this.drafted.set(d.req, { ...d, tree: trees[i] });
    });
    const autoDepths = toDraft.filter((d) => d.autoDepth > 0).map((d) => d.autoDepth);
    if (autoDepths.length > 0) this.opts.cost?.observeDraft(autoDepths, pending.draftMs ?? 0);
  }

  private fail(reqs: Request[], message: string, events: EngineEvent[]): void {
    for (const req of reqs) {
      if (req.done && !this.requests.has(req.id)) continue;
      req.finishReason = "error";
      req.error = message;
      this.finish(req, events);
    }
  }

  /** Steps until `req` (or every request) is done; returns the events. */
  runUntilDone(req?: Request): EngineEvent[] {
    const events: EngineEvent[] = [];
    while (req ? this.requests.has(req.id) : !this.idle || this.requests.size > 0) events.push(...this.step());
    return events;
  }

  private update(plan: StepPlan, run: StepRun, events: EngineEvent[]): void {
    const decodeEntries = plan.entries.filter((e): e is DecodeEntry => e.kind === "decode");
    this.lastStep = { decodes: decodeEntries.length, treeNodes: [] };
    // Trees drafted in an earlier step were costed when they were collected.
    const autoDepths = decodeEntries.filter((e) => e.autoDepth > 0 && e.drafted === undefined).map((e) => e.autoDepth);
    if (autoDepths.length > 0) this.opts.cost?.observeDraft(autoDepths, run.draftMs);
    this.opts.cost?.observeStep(run.batchTokens, run.forwardMs);

    const picks = this.pickAll(plan, run);
    plan.entries.forEach((entry, i) => {
      const req = entry.req;
      try {
        this.updateEntry(entry, run, i, picks[i], events);
      } catch (e) {
        // A request whose tokens cannot be picked (e.g. no mass left) fails alone.
        if (!this.requests.has(req.id)) return;
        req.finishReason = "error";
        req.error = (e as Error)?.message ?? String(e);
        this.finish(req, events);
      }
    });
  }

  private updateEntry(entry: StepEntry, run: StepRun, i: number, pick: TreeOutcome | null, events: EngineEvent[]): void {
    const vocab = this.llm.config.vocabSize;
    const req = entry.req;
    const { first, tree } = run.rows[i];
    // Logits rows on the host only for what reads them there (logprobs).
    const row = (r: number) => run.logits.host().subarray((first + r) * vocab, (first + r + 1) * vocab);
    const committed = this.kv.committed(req.row);
    if (entry.kind === "prefill") {
      this.kv.commit(req.row, range(committed, entry.count));
      req.stats.prefill(entry.count, run.forwardMs);
      if (req.generated.length === 0) this.counters.promptTokens += entry.count;
      if (entry.emits) this.emit(req, [pickedToken(pick!)], [false], () => row(0), events);
      if (req.finishReason) this.finish(req, events);
      return;
    }
    req.stats.step(run.forwardMs, run.draftMs / Math.max(1, this.lastStep.decodes), tree?.size ?? 0);
    this.lastStep.treeNodes.push(tree?.size ?? 0);
    if (tree) {
      const result = this.verifyTree(entry, tree.tree, first, pick!);
      const acceptedNodes = result.accepted;
      if (entry.autoDepth > 0) {
        req.acceptance.observe(tree.size, acceptedNodes.length);
        this.opts.cost?.acceptance.observe(tree.size, acceptedNodes.length);
      }
      req.stepsWithoutDraft = 0;
      // Root plus the accepted nodes (batch index 1 + node) stay in the cache.
      this.kv.commit(req.row, [committed, ...acceptedNodes.map((n) => committed + 1 + n)]);
      // Emitted token k is predicted by the root's row (k = 0) or accepted node k-1's.
      const at = [0, ...acceptedNodes.map((n) => 1 + n)];
      this.speculator?.accept(req.id, result.tokens);
      const kept = this.emit(req, result.tokens, result.tokens.map((_, k) => k < acceptedNodes.length), (k) => row(at[k]), events);
      // Accepted drafts cut by a stop condition were not emitted: they do not count.
      const accepted = acceptedNodes.slice(0, kept);
      req.stats.speculative(tree, accepted);
      this.countDraft(tree.size, accepted.map((n) => tree.depthOf(n)));
      if (req.finishReason) this.finish(req, events);
    } else {
      req.stepsWithoutDraft++;
      if (req.speculation.kind === "auto") this.opts.cost?.observeIdle(req.acceptance);
      this.kv.commit(req.row, [committed]);
      const token = pickedToken(pick!);
      this.speculator?.accept(req.id, [token]);
      this.emit(req, [token], [false], () => row(0), events);
      if (req.finishReason) this.finish(req, events);
    }
  }

  /** The accepted path of a decode entry's tree. Greedy and per-position trees follow
   *  the LLM's own picks (the native walk); other sampled trees run multi-step
   *  speculative sampling over the processed rows, with the request's rng. */
  private verifyTree(entry: DecodeEntry, tree: TokenTree, first: number, pick: TreeOutcome): VerifyResult {
    const req = entry.req;
    if (isGreedy(req.params) || entry.draft?.perPosition) {
      return outcome(tree, pick.accepted.map((row) => row - 1), pickedToken(pick));
    }
    return sampleTree(tree, (row) => this.sampler.probsRow(first + row), req.rng);
  }

  /** Every logits row of the step through the backend's sampler: one row per emitting
   *  prefill or plain decode, root + nodes per tree; one outcome per entry (null: no rows). */
  private pickAll(plan: StepPlan, run: StepRun): (TreeOutcome | null)[] {
    const rows: SampleRow[] = [];
    const trees: TreeRows[] = [];
    const treeOf: number[] = [];
    plan.entries.forEach((entry, i) => {
      const { first, count, tree } = run.rows[i];
      if (count === 0) {
        treeOf.push(-1);
        return;
      }
      if (first !== rows.length) throw new Error(`engine: entry ${i} starts at logits row ${first}, expected ${rows.length}`);
      const req = entry.req;
      const step = requestRows(req.params, req.config.seed, req.tokens, tree?.tree ?? null);
      rows.push(...step.rows);
      trees.push(step.tree);
      treeOf.push(trees.length - 1);
    });
    const outcomes = this.sampler.step(run.logits, rows, trees);
    return treeOf.map((t) => (t < 0 ? null : outcomes[t]));
  }

  private countDraft(nodes: number, acceptedDepths: number[]): void {
    const c = this.counters;
    c.numDrafts++;
    c.numDraftTokens += nodes;
    c.numAcceptedTokens += acceptedDepths.length;
    for (const d of acceptedDepths) c.acceptedPerPosition[d - 1] = (c.acceptedPerPosition[d - 1] ?? 0) + 1;
  }

  /** Appends tokens until a stop condition (EOS, stop ids, max tokens, context, stop
   *  string) and emits them with their text. Returns how many of `tokens` were kept;
   *  sets finishReason when one hit (the caller finishes the request once its
   *  statistics are in). `logitsOf(k)` is token k's logits row, read for logprobs only. */
  private emit(req: Request, tokens: number[], fromDraft: boolean[], logitsOf: (k: number) => Float32Array, events: EngineEvent[]): number {
    let keep = tokens.length;
    let reason: FinishReason | null = null;
    for (let k = 0; k < tokens.length; k++) {
      const t = tokens[k];
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
    let kept = tokens.slice(0, keep);
    let text = "";
    if (req.text && kept.length > 0) {
      const update = req.text.push(kept);
      text = update.text;
      if (update.keepTokens !== undefined) {
        kept = kept.slice(0, update.keepTokens);
        reason = "stop";
      }
    }
    const logprobs = req.logprobs ? kept.map((t, k) => tokenLogprob(logitsOf(k), t, req.config.logprobs!)) : undefined;
    for (let k = 0; k < kept.length; k++) {
      req.generated.push(kept[k]);
      req.fromDraft.push(fromDraft[k]);
      req.tokens.push(kept[k]);
    }
    if (logprobs) req.logprobs!.push(...logprobs);
    this.counters.generatedTokens += kept.length;
    if (kept.length > 0 || text) {
      events.push({ type: "tokens", id: req.id, text, tokens: kept, fromDraft: fromDraft.slice(0, kept.length), ...(logprobs ? { logprobs } : {}) });
    }
    if (reason) req.finishReason = reason;
    return kept.length;
  }

  private finish(req: Request, events: EngineEvent[]): void {
    if (!this.requests.delete(req.id)) return;
    this.scheduler.remove(req);
    this.drafted.delete(req);
    this.speculator?.close(req.id);
    const tail = req.text && req.finishReason !== "error" ? req.text.finish() : "";
    events.push({
      type: "finish",
      id: req.id,
      reason: req.finishReason ?? "cancelled",
      text: tail,
      ...(req.error ? { error: req.error } : {}),
      promptTokens: req.prompt.length,
      stats: req.stats.summary(req.generated.length),
    });
  }

  stats(): EngineStats {
    return {
      running: this.scheduler.running.length,
      waiting: this.scheduler.waiting.length,
      kvBlocksUsed: this.kv.totalBlocks - this.kv.freeBlocks,
      kvBlocksTotal: this.kv.totalBlocks,
      preemptions: this.scheduler.preemptions,
      ...this.counters,
      acceptedPerPosition: [...this.counters.acceptedPerPosition],
      costCurve: this.opts.cost?.llm.points ?? [],
      lastStep: this.lastStep,
    };
  }

  /** Cancels everything and frees the caches (the models are the runtime's). */
  close(): EngineEvent[] {
    const events: EngineEvent[] = [];
    if (this.closed) return events;
    this.closed = true;
    for (const id of [...this.requests.keys()]) events.push(...this.cancel(id));
    this.speculator?.closeAll();
    this.kv.close();
    this.sampler.close();
    return events;
  }
}

/** The target model's log-probability of `token` under `row` (log-softmax of the raw
 *  logits), with the `top` most likely alternatives. */
export function tokenLogprob(row: Float32Array, token: number, top: number): TokenLogprob {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const logZ = max + Math.log(sum);
  return {
    token,
    logprob: row[token] - logZ,
    top: top > 0 ? Array.from(topIndices(row, top), (t) => ({ token: t, logprob: row[t] - logZ })) : [],
  };
}

/** The token a row picked; -1 means its distribution had no mass. */
function pickedToken(pick: TreeOutcome): number {
  if (pick.bonus < 0) {
    throw new Error("sampling: the distribution has no mass (every logit is -inf or NaN after penalties, bias and temperature)");
  }
  return pick.bonus;
}

function range(start: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => start + i);
}

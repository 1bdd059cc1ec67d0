// The scheduler decides each step, as plain data, what every request does: a prefill
// chunk, or a decode step with a tree (or none). It owns the waiting and running
// queues and the LLM's KV blocks: blocks are taken as a step needs them (a prompt's
// chunk, a tree's rows), not promised up front for max tokens. When a step cannot get
// the blocks it needs, the most recently admitted running request is preempted: its
// blocks are freed, its tokens and RNG state kept, and it is recomputed by prefill when
// it is admitted again (vLLM v1's policy).

import type { KVCache } from "../kv/cache";
import type { DraftPlan, Speculator, StepDraft } from "../speculation/speculator";
import { AUTO_MAX_DEPTH, chainShape } from "../speculation/speculator";
import { shapeDepth } from "../speculation/tree";
import { PROBE_DEPTH, type CostModel } from "./cost";
import type { Request } from "./request";

export interface PrefillEntry {
  kind: "prefill";
  req: Request;
  /** Tokens [start, start + count) of req.tokens. */
  start: number;
  count: number;
  /** The chunk ends a fresh prompt: its last row's logits give the first token. */
  emits: boolean;
}

export interface DecodeEntry {
  kind: "decode";
  req: Request;
  /** How it drafts this step; null decodes one token. */
  draft: DraftPlan | null;
  /** Chain length the cost model chose (auto requests), for its acceptance estimate. */
  autoDepth: number;
  /** The tree drafted in an earlier step (SSMs on their own thread); absent: drafted now. */
  drafted?: StepDraft | null;
}

/** A request to draft this step (while the LLM verifies others) and verify the next. */
export interface DraftEntry {
  req: Request;
  draft: DraftPlan;
  autoDepth: number;
}

/** A draft collected after its step, waiting for the step that verifies it. */
export type DraftedEntry = DraftEntry & { tree: StepDraft | null };

export type StepEntry = PrefillEntry | DecodeEntry;

export interface StepPlan {
  entries: StepEntry[];
  /** Pipelined steps: requests whose trees the SSMs grow during this step's forward. */
  toDraft: DraftEntry[];
  admitted: Request[];
  preempted: Request[];
  /** Requests alone in the pool that cannot grow: the pool is their context. */
  full: Request[];
}

export interface SchedulerLimits {
  maxRequests: number;
  maxTokensPerBatch: number;
  /** Most logit rows one forward returns. */
  maxLogitRows: number;
}

export class Scheduler {
  readonly waiting: Request[] = [];
  readonly running: Request[] = [];
  private admissions = 0;
  preemptions = 0;
  /** Pipelined: steps each request has been held back from drafting (the longest waiting go first). */
  private readonly held = new Map<Request, number>();

  constructor(
    private readonly kv: KVCache,
    private readonly speculator: Speculator | null,
    private readonly cost: CostModel | null,
    private readonly limits: SchedulerLimits,
  ) {}

  get idle(): boolean {
    return this.waiting.length === 0 && this.running.length === 0;
  }

  /** Blocks a request needs to be admitted: its tokens plus one tree. */
  admissionBlocks(req: Request): number {
    return Math.ceil((req.tokens.length + this.treeRows(req)) / this.kv.blockSize);
  }

  /** Batch rows of this request's largest decode step (root + tree). */
  treeRows(req: Request): number {
    const s = req.speculation;
    if (s.kind === "off" || !this.speculator) return 1;
    if (s.kind === "fixed") return 1 + this.speculator.maxNodes(s.plan);
    const auto = this.autoPlan(req, AUTO_MAX_DEPTH);
    return 1 + (auto ? this.speculator.maxNodes(auto) : 0);
  }

  /** Drops a finished or cancelled request from the queues and frees its blocks. */
  remove(req: Request): void {
    const w = this.waiting.indexOf(req);
    if (w >= 0) this.waiting.splice(w, 1);
    const r = this.running.indexOf(req);
    if (r >= 0) this.running.splice(r, 1);
    this.held.delete(req);
    if (req.row >= 0) {
      this.kv.closeSequence(req.row);
      req.row = -1;
    }
  }

  /** The next step. `drafted` (SSMs on their own thread): the trees drafted during the
   *  last step, verified in this one, while the other speculating requests (at most
   *  half of them, so the two micro-batches stay even) are drafted for the next. */
  schedule(drafted?: ReadonlyMap<Request, DraftedEntry>): StepPlan {
    const plan: StepPlan = { entries: [], toDraft: [], admitted: [], preempted: [], full: [] };
    let tokens = this.limits.maxTokensPerBatch;
    let logitRows = this.limits.maxLogitRows;
    const scheduled = new Set<Request>();

    // Running requests in admission order: decodes first, then prefill chunks.
    const decoding = this.running.filter((r) => this.kv.committed(r.row) >= r.prefillTarget);
    const prefilling = this.running.filter((r) => this.kv.committed(r.row) < r.prefillTarget);
    const pendingPrefill = prefilling.reduce((n, r) => n + r.prefillTarget - this.kv.committed(r.row), 0);
    const undrafted = decoding.filter((r) => !drafted?.has(r));
    const draftedRows = decoding.reduce((n, r) => n + (drafted?.has(r) ? 1 + (drafted.get(r)!.tree?.size ?? 0) : 0), 0);
    const drafts = this.chooseDrafts(undrafted, Math.min(pendingPrefill, tokens) + draftedRows);
    const overlap = drafted !== undefined && this.overlapPays(decoding, drafted, undrafted, drafts, Math.min(pendingPrefill, tokens));
    const toDraft = overlap ? this.pickToDraft(undrafted, drafts, decoding.length - undrafted.length) : new Set<Request>();

    for (const req of decoding) {
      if (req.row < 0) continue; // preempted for an older request's blocks
      const ready = drafted?.get(req);
      const { draft, autoDepth } = ready ?? drafts[undrafted.indexOf(req)];
      if (!ready && overlap && draft?.shape) {
        if (toDraft.has(req)) plan.toDraft.push({ req, draft, autoDepth });
        continue;
      }
      const rows = 1 + (ready ? (ready.tree?.size ?? 0) : draft && this.speculator ? this.speculator.maxNodes(draft) : 0);
      if (rows > Math.min(tokens, logitRows)) continue; // waits for a step with room
      if (!this.makeRoom(req, rows, scheduled, plan)) {
        if (req.row >= 0) plan.full.push(req);
        continue;
      }
      this.kv.reserve(req.row, rows);
      scheduled.add(req);
      plan.entries.push({ kind: "decode", req, draft, autoDepth, ...(ready ? { drafted: ready.tree } : {}) });
      tokens -= rows;
      logitRows -= rows;
    }
    // A request preempted later in the loop is not drafted.
    plan.toDraft = plan.toDraft.filter((d) => d.req.row >= 0);
    for (const req of prefilling) {
      if (req.row < 0) continue;
      const count = this.chunk(req, tokens, logitRows);
      if (count === 0) continue;
      scheduled.add(req);
      plan.entries.push(this.prefill(req, count));
      tokens -= count;
      logitRows -= this.emits(req, count) ? 1 : 0;
    }

    // Admission: blocks for the prompt plus one tree must be free, counting what the
    // requests admitted this step still need for the rest of their prompts.
    let promised = 0;
    while (this.waiting.length > 0 && this.running.length < this.limits.maxRequests && tokens > 0 && logitRows > 0) {
      const req = this.waiting[0];
      const need = this.admissionBlocks(req);
      if (need > this.kv.freeBlocks - promised) break;
      this.waiting.shift();
      req.row = this.kv.openSequence();
      if (req.admittedAt < 0) req.admittedAt = this.admissions++;
      this.insertRunning(req);
      plan.admitted.push(req);
      const count = this.chunk(req, tokens, logitRows);
      if (count > 0) {
        scheduled.add(req);
        plan.entries.push(this.prefill(req, count));
        tokens -= count;
        logitRows -= this.emits(req, count) ? 1 : 0;
      }
      promised += Math.max(0, need - this.kv.tables.blocksOf(req.row).length);
    }
    return plan;
  }

  /** Frees blocks until `rows` more slots fit `req`, preempting the most recently
   *  admitted running request not yet scheduled this step (possibly `req` itself).
   *  Returns false when `req` cannot have them: preempted, or alone and still short
   *  (the whole pool is too small for it to grow). */
  private makeRoom(req: Request, rows: number, scheduled: Set<Request>, plan: StepPlan): boolean {
    while (this.kv.blocksToReserve(req.row, rows) > this.kv.freeBlocks) {
      const victims = this.running.filter((r) => r !== req && !scheduled.has(r));
      if (victims.length === 0 && scheduled.size === 0) return false;
      const victim = victims.length > 0 ? victims.reduce((a, b) => (b.admittedAt > a.admittedAt ? b : a)) : req;
      this.preempt(victim, plan);
      if (victim === req) return false;
    }
    return true;
  }

  private preempt(req: Request, plan: StepPlan): void {
    this.remove(req);
    this.preemptions++;
    req.stats.preemptions++;
    // Back to the queue ahead of newer requests: admission order decides.
    let at = 0;
    while (at < this.waiting.length && this.waiting[at].admittedAt >= 0 && this.waiting[at].admittedAt < req.admittedAt) at++;
    this.waiting.splice(at, 0, req);
    plan.preempted.push(req);
  }

  private insertRunning(req: Request): void {
    let at = this.running.length;
    while (at > 0 && this.running[at - 1].admittedAt > req.admittedAt) at--;
    this.running.splice(at, 0, req);
  }

  /** The next prefill chunk of `req` that fits the token budget and the free blocks. */
  private chunk(req: Request, tokens: number, logitRows: number): number {
    const committed = this.kv.committed(req.row);
    const room = this.kv.capacity(req.row) - committed + this.kv.freeBlocks * this.kv.blockSize;
    let count = Math.min(req.prefillTarget - committed, tokens, room);
    if (count > 0 && this.emits(req, count) && logitRows < 1) count--;
    if (count <= 0) return 0;
    this.kv.reserve(req.row, count);
    return count;
  }

  private emits(req: Request, count: number): boolean {
    return req.generated.length === 0 && this.kv.committed(req.row) + count === req.tokens.length;
  }

  private prefill(req: Request, count: number): PrefillEntry {
    const start = this.kv.committed(req.row);
    return { kind: "prefill", req, start, count, emits: this.emits(req, count) };
  }

  /** Whether this step verifies one micro-batch while the SSMs draft the other (the
   *  cost model's call; without one, whenever two requests speculate), or drafts and
   *  verifies every speculating request itself (trees drafted earlier included). */
  private overlapPays(
    decoding: Request[],
    drafted: ReadonlyMap<Request, DraftedEntry>,
    undrafted: Request[],
    drafts: { draft: DraftPlan | null }[],
    prefillRows: number,
  ): boolean {
    const speculating: { depth: number; rows: number }[] = [];
    let otherRows = prefillRows;
    for (const req of decoding) {
      const ready = drafted.get(req);
      const plan = ready?.draft ?? drafts[undrafted.indexOf(req)].draft;
      if (!plan || !plan.shape) {
        otherRows += 1 + (plan && this.speculator ? this.speculator.maxNodes(plan) : 0);
        continue;
      }
      speculating.push({ depth: shapeDepth(plan.shape), rows: 1 + (ready ? (ready.tree?.size ?? 0) : this.speculator!.maxNodes(plan)) });
    }
    if (!this.cost) return speculating.length >= 2;
    return this.cost.overlapPays(speculating, otherRows);
  }

  /** Which of the undrafted speculating requests draft this step: with the `verifying`
   *  ones, at most half of all, those held back longest first. */
  private pickToDraft(undrafted: Request[], drafts: { draft: DraftPlan | null }[], verifying: number): Set<Request> {
    const wanting = undrafted.filter((_, i) => drafts[i].draft?.shape);
    const room = Math.max(1, Math.ceil((wanting.length + verifying) / 2));
    const order = [...wanting].sort((a, b) => (this.held.get(b) ?? 0) - (this.held.get(a) ?? 0));
    const picked = new Set(order.slice(0, room));
    for (const req of wanting) this.held.set(req, picked.has(req) ? 0 : (this.held.get(req) ?? 0) + 1);
    return picked;
  }

  /** Each decoding request's draft plan: none, its fixed plan, or (auto) the chain
   *  length the cost model finds best for the batch as it is this step. */
  private chooseDrafts(decoding: Request[], prefillRows: number): { draft: DraftPlan | null; autoDepth: number }[] {
    const out = decoding.map((req) => {
      const s = req.speculation;
      if (s.kind === "fixed" && this.speculator) return { draft: s.plan as DraftPlan | null, autoDepth: 0 };
      return { draft: null as DraftPlan | null, autoDepth: 0 };
    });
    const auto = decoding
      .map((req, i) => ({ req, i }))
      .filter(({ req }) => req.speculation.kind === "auto" && this.speculator !== null);
    if (auto.length === 0 || !this.cost) return out;
    const isAuto = new Set(auto.map((a) => a.i));
    const fixedRows = prefillRows + out.reduce((n, o, i) => n + (isAuto.has(i) ? 0 : 1 + (o.draft ? this.speculator!.maxNodes(o.draft) : 0)), 0);
    const fixedTokens = decoding.length - auto.length;
    const remaining = (req: Request) => req.config.maxNewTokens - req.generated.length - 1;
    const depths = this.cost.choose(
      auto.map(({ req }) => ({ acceptance: req.acceptance, maxDepth: Math.max(0, Math.min(AUTO_MAX_DEPTH, remaining(req))) })),
      fixedRows,
      fixedTokens,
      Math.min(this.limits.maxTokensPerBatch, this.limits.maxLogitRows),
    );
    const batchRows = fixedRows + depths.reduce((n, d) => n + 1 + d, 0);
    // A request kept at no tree probes now and then (its estimate gets no news
    // otherwise): at most one per step, the one that waited longest.
    let probe = -1;
    auto.forEach(({ req }, k) => {
      if (depths[k] === 0 && remaining(req) > 0 && (probe < 0 || req.stepsWithoutDraft > auto[probe].req.stepsWithoutDraft)) probe = k;
    });
    if (probe >= 0) {
      const req = auto[probe].req;
      if (this.cost.probe(req.stepsWithoutDraft, this.speculator!.catchUpTokens(req.id, req.tokens.length), batchRows, decoding.length)) {
        depths[probe] = Math.min(PROBE_DEPTH, remaining(req));
      }
    }
    auto.forEach(({ req, i }, k) => (out[i] = { draft: depths[k] > 0 ? this.autoPlan(req, depths[k]) : null, autoDepth: depths[k] }));
    return out;
  }

  /** An auto request's plan: a chain of `depth` SSM nodes. */
  private autoPlan(req: Request, depth: number): DraftPlan | null {
    if (req.speculation.kind !== "auto" || !this.speculator) return null;
    return { shape: chainShape(Math.max(1, depth)), ngram: false, perPosition: true };
  }
}

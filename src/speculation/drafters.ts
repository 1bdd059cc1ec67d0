// The speculator's SSMs behind one narrow interface: on the engine's thread (here), or
// on a thread of their own (the runtime's RemoteDrafters), where they draft one batch
// of requests while the LLM verifies another.

import type { ExpandedTree } from "./expand";
import { SSMDrafter, type DraftRequest } from "./ssm";

export interface DraftModels {
  /** How many SSMs draft (each grows its own tree per request). */
  readonly count: number;
  /** Most nodes one SSM may grow for one request in one step. */
  readonly maxGrowth: number;
  /** true: `start` returns at once and the trees grow while the caller goes on. */
  readonly concurrent: boolean;
  open(request: number): void;
  close(request: number): void;
  closeAll(): void;
  /** Tokens appended to a request after verification (see SSMDrafter.accept). */
  accept(request: number, newTokens: readonly number[]): void;
  /** Tokens a draft would feed to catch up a request now holding `tokens` (the most of any SSM). */
  catchUpTokens(request: number, tokens: number): number;
  /** Starts one tree per request with every SSM; `collect` returns them. */
  start(requests: DraftRequest[]): void;
  /** The trees of the last `start`, [ssm][request] (each request's rng advanced as
   *  drafting drew), and the milliseconds the drafting itself took. */
  collect(): { trees: ExpandedTree[][]; ms: number };
  /** KV blocks the SSMs hold (0 once every request has ended). */
  blocksInUse(): number;
}

/** SSMs on the engine's thread: `start` drafts at once. */
export class LocalDrafters implements DraftModels {
  readonly concurrent = false;
  private drafted: { trees: ExpandedTree[][]; ms: number } | null = null;

  constructor(private readonly ssms: SSMDrafter[], readonly maxGrowth: number) {}

  get count(): number {
    return this.ssms.length;
  }

  open(request: number): void {
    for (const s of this.ssms) s.open(request);
  }

  close(request: number): void {
    for (const s of this.ssms) s.close(request);
  }

  closeAll(): void {
    for (const s of this.ssms) s.closeAll();
  }

  accept(request: number, newTokens: readonly number[]): void {
    for (const s of this.ssms) s.accept(request, newTokens);
  }

  catchUpTokens(request: number, tokens: number): number {
    return Math.max(0, ...this.ssms.map((s) => s.catchUpTokens(request, tokens)));
  }

  start(requests: DraftRequest[]): void {
    const t0 = performance.now();
    const trees = this.ssms.map((s) => s.draft(requests));
    this.drafted = { trees, ms: performance.now() - t0 };
  }

  collect(): { trees: ExpandedTree[][]; ms: number } {
    const drafted = this.drafted;
    if (!drafted) throw new Error("drafters: collect without start");
    this.drafted = null;
    return drafted;
  }

  blocksInUse(): number {
    return this.ssms.reduce((n, s) => n + s.kv.totalBlocks - s.kv.freeBlocks, 0);
  }
}

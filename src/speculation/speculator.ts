// The speculation step the engine calls: every drafter proposes a tree per request,
// the trees merge into one trie, the trie is laid into the LLM's TokenBatch, and the
// LLM's logits verify it. Drafters: SSMs (models with their own KV caches) and
// prompt lookup (n-gram, no model). Each request says how it speculates (its own
// tree shape, prompt lookup on or off); requests that differ share one forward.

import type { BatchBuilder } from "../model/batch";
import type { CausalLM } from "../model/causal-lm";
import { LocalDrafters, type DraftModels } from "./drafters";
import { growthCapacity } from "./expand";
import { NgramDrafter } from "./ngram";
import type { Rng } from "./rng";
import { isGreedy, type SamplingParams } from "./sampling";
import { SSMDrafter } from "./ssm";
import { linearize, mergeTrees, parseTreeShape, shapeCapacity, type DraftTree, type TokenTree, type TreeShape } from "./tree";
import { verify } from "./verify";

/** The default tree, chosen by measurement (BENCHMARKS.md, bench:cpu widened pair at
 *  TinyLlama-1.1B cost, 2 CPU threads): the 3-token chain gave 52.7 tok/s (2.4x
 *  incremental), dynamic:6 49.7, 1,1,1,1,1,1 42.3, SpecInfer's 1,1,3,1,1,1,1,1 18.8:
 *  on 2 cores a 4-token verify costs about one decode step, a 21-token one three. */
export const DEFAULT_TREE = "1,1,1";

/** Prompt-lookup settings: continuation length and branches. */
const NGRAM = { maxN: 3, minN: 1, length: 8, branches: 2 };
const NGRAM_NODES = NGRAM.length * NGRAM.branches;

/** Most nodes one drafter may grow for one request in one step (dynamic trees grow
 *  many and keep few): bounds the SSM caches' rows, so per-request shapes up to it
 *  need no reallocation. Blocks are taken on demand, so the bound costs no memory. */
export const MAX_GROWTH = 1024;

/** Longest chain "auto" speculation considers. */
export const AUTO_MAX_DEPTH = 6;

/** A chain of `depth` nodes (width 1 at every depth). */
export function chainShape(depth: number): TreeShape {
  return { kind: "static", widths: Array(depth).fill(1) };
}

/** How one request drafts in one step. */
export interface DraftPlan {
  /** The SSMs' tree shape; null drafts without SSMs. */
  shape: TreeShape | null;
  ngram: boolean;
  /** Verify with a fixed draw per position (see verify's `uniforms`) and let drafters
   *  propose their most likely tokens: a sampled request's text then does not depend on
   *  its trees. Otherwise sampled requests use multi-step speculative sampling. */
  perPosition?: boolean;
}

/** One request's merged tree for one step. */
export class StepDraft {
  constructor(readonly tree: TokenTree, private readonly vocab: number) {}

  get size(): number {
    return this.tree.size;
  }

  /** Tree nodes the LLM checks (for stats). */
  get nodes(): number {
    return this.tree.size;
  }

  depthOf(node: number): number {
    return this.tree.depths[node];
  }

  /** Rank of a node among its siblings (0 = first proposed). */
  rankOf(node: number): number {
    return this.tree.children[this.tree.parents[node] + 1].indexOf(node);
  }

  /** Adds the root and the tree to the LLM batch (root at uncommitted index 0, node i at 1 + i). */
  linearize(builder: BatchBuilder, row: number, committed: number, rootToken: number, rootPosition: number): void {
    linearize(this.tree, { seqRow: row, committed, rootToken, rootPosition }, builder);
  }

  /** `rows`: the LLM's logits at the root and every node, in linearize order.
   *  `uniforms`: per-position draws (DraftPlan.perPosition) instead of `rng`. */
  verify(rows: Float32Array, params: SamplingParams, rng: Rng, context: readonly number[], uniforms?: (depth: number) => number) {
    const r = verify(this.tree, rows, this.vocab, { params, rng, context, uniforms });
    return { acceptedNodes: r.accepted, tokens: r.tokens };
  }
}

export interface SpeculationOptions {
  /** SSMs drafting on the engine's thread. */
  ssms: CausalLM[];
  /** Or SSMs set up elsewhere (their own thread, see runtime/remote-drafters.ts),
   *  grown to `draftGrowth(tree)`; `ssms` is then empty. */
  drafters?: DraftModels;
  /** Static widths ("1,1,3,1,1" or [1,1,3,1,1]) or "dynamic:N": the shape of requests
   *  that ask for a fixed tree without naming one; default DEFAULT_TREE. */
  tree?: string | number[];
  /** Prompt lookup for requests that do not say. */
  ngram: boolean;
}

export interface SpeculatingRequest {
  request: number;
  tokens: readonly number[];
  params: SamplingParams;
  rng: Rng;
  plan: DraftPlan;
}

/** Draft trees that `Speculator.startDraft` began; `finishDraft` returns them. */
export interface PendingDraft {
  requests: SpeculatingRequest[];
  withModels: SpeculatingRequest[];
  /** Set by finishDraft: what the SSMs' drafting took, wherever it ran. */
  draftMs?: number;
}

/** Most nodes a drafter grows per request and step for requests of compiled tree `tree`. */
export function draftGrowth(tree?: string | number[]): number {
  return Math.max(MAX_GROWTH, growthCapacity(parseTreeShape(Array.isArray(tree) ? tree.join(",") : (tree ?? DEFAULT_TREE))));
}

export class Speculator {
  /** The shape of fixed-tree requests that name none. */
  readonly shape: TreeShape;
  private readonly drafters: DraftModels;
  private readonly ngrams = new Map<number, NgramDrafter>();

  constructor(
    maxSeqs: number,
    maxSeqLen: number,
    private readonly vocab: number,
    /** Rows one LLM forward can verify (its token and logits limits). */
    private readonly maxTreeRows: number,
    readonly opts: SpeculationOptions,
  ) {
    this.shape = parseTreeShape(Array.isArray(opts.tree) ? opts.tree.join(",") : (opts.tree ?? DEFAULT_TREE));
    for (const m of opts.ssms) {
      if (m.config.vocabSize !== vocab) throw new Error(`draft model vocabulary (${m.config.vocabSize}) differs from the LLM's (${vocab})`);
    }
    const growth = draftGrowth(opts.tree);
    this.drafters = opts.drafters ?? new LocalDrafters(opts.ssms.map((m) => new SSMDrafter(m, maxSeqs, maxSeqLen, growth)), growth);
    this.check({ shape: this.shape, ngram: opts.ngram });
  }

  get hasModels(): boolean {
    return this.drafters.count > 0;
  }

  /** The SSMs draft on a thread of their own: the engine verifies one micro-batch while
   *  they draft the next. */
  get concurrent(): boolean {
    return this.drafters.concurrent && this.hasModels;
  }

  /** KV blocks the SSMs hold (tests check they drain). */
  draftBlocksInUse(): number {
    return this.drafters.blocksInUse();
  }

  /** The plan of a request asking for a fixed tree (`tree` unset: the compiled shape;
   *  `ngram` unset: the compiled setting). Throws, naming the field, when it cannot run. */
  fixedPlan(tree: string | undefined, ngram: boolean | undefined): DraftPlan {
    if (tree !== undefined && !this.hasModels) throw new Error("speculation.tree needs a draft model (compile with ssms)");
    const plan: DraftPlan = {
      shape: this.hasModels ? (tree === undefined ? this.shape : parseTreeShape(tree)) : null,
      ngram: ngram ?? this.opts.ngram,
    };
    this.check(plan);
    return plan;
  }

  /** Most tree nodes (root excluded) a step of this plan can put in the LLM batch. */
  maxNodes(plan: DraftPlan): number {
    return (plan.shape ? this.drafters.count * shapeCapacity(plan.shape) : 0) + (plan.ngram ? NGRAM_NODES : 0);
  }

  private check(plan: DraftPlan): void {
    if (plan.shape && this.hasModels && growthCapacity(plan.shape) > this.drafters.maxGrowth) {
      throw new Error(`speculation.tree: a tree may grow at most ${this.drafters.maxGrowth} nodes per drafter`);
    }
    const nodes = this.maxNodes(plan);
    if (nodes + 1 > this.maxTreeRows) {
      throw new Error(`speculation.tree: a merged tree may have ${nodes} nodes; one forward verifies at most ${this.maxTreeRows - 1} (use a smaller tree or fewer drafters)`);
    }
  }

  open(request: number, ngram: boolean): void {
    this.drafters.open(request);
    if (ngram) this.ngrams.set(request, new NgramDrafter(NGRAM));
  }

  close(request: number): void {
    this.drafters.close(request);
    this.ngrams.delete(request);
  }

  closeAll(): void {
    this.drafters.closeAll();
    this.ngrams.clear();
  }

  /** One merged tree per request (null when no drafter proposed anything). */
  draft(requests: SpeculatingRequest[]): (StepDraft | null)[] {
    return this.finishDraft(this.startDraft(requests));
  }

  /** Starts the SSMs on the requests' trees (on their own thread they grow while the
   *  caller goes on); every start is finished exactly once. */
  startDraft(requests: SpeculatingRequest[]): PendingDraft {
    const withModels = requests.filter((r) => r.plan.shape !== null);
    if (withModels.length > 0) {
      this.drafters.start(withModels.map((r) => ({ request: r.request, shape: r.plan.shape!, sample: !isGreedy(r.params) && !r.plan.perPosition, tokens: r.tokens, params: r.params, rng: r.rng })));
    }
    return { requests, withModels };
  }

  /** The merged trees of a started draft: the SSMs' (waited for) with prompt lookup's. */
  finishDraft(pending: PendingDraft): (StepDraft | null)[] {
    const drafted = pending.withModels.length > 0 ? this.drafters.collect() : { trees: [], ms: 0 };
    pending.draftMs = drafted.ms;
    const perSSM = drafted.trees;
    return pending.requests.map((r) => {
      const at = pending.withModels.indexOf(r);
      const trees: DraftTree[] = at >= 0 ? perSSM.map((trees) => trees[at]) : [];
      const ngram = r.plan.ngram ? this.ngrams.get(r.request) : undefined;
      if (ngram) {
        ngram.push(r.tokens.slice(ngram.length));
        trees.push(ngram.draft());
      }
      const merged = mergeTrees(trees);
      return merged.size > 0 ? new StepDraft(merged, this.vocab) : null;
    });
  }

  /** Tokens appended to a request after a decode step (accepted drafts + the LLM's own). */
  accept(request: number, newTokens: readonly number[]): void {
    this.drafters.accept(request, newTokens);
  }

  /** Tokens the SSMs would feed to catch up before drafting for a request now holding
   *  `tokens` tokens (the most of any SSM). */
  catchUpTokens(request: number, tokens: number): number {
    return this.drafters.catchUpTokens(request, tokens);
  }
}

/** A speculator shaped for `llm`: trees small enough for one of its forwards. */
export function createSpeculator(llm: CausalLM, maxSeqs: number, opts: SpeculationOptions, maxSeqLen = llm.config.maxPositionEmbeddings): Speculator {
  return new Speculator(maxSeqs, maxSeqLen, llm.config.vocabSize, Math.min(llm.maxBatchTokens, llm.maxLogitRows), opts);
}

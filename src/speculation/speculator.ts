// The speculation step the engine calls: every drafter proposes a tree per request,
// the trees merge into one trie, the trie is laid into the LLM's TokenBatch, and the
// LLM's logits verify it. Drafters: SSMs (models with their own KV caches) and
// prompt lookup (n-gram, no model).

import type { KVCache } from "../kv/cache";
import type { BatchBuilder } from "../model/batch";
import type { LlamaModel } from "../model/llama";
import { growthCapacity } from "./expand";
import { NgramDrafter } from "./ngram";
import type { Rng } from "./rng";
import type { SamplingParams } from "./sampling";
import { SSMDrafter, type DraftRequest } from "./ssm";
import { linearize, mergeTrees, parseTreeShape, shapeCapacity, type DraftTree, type TokenTree, type TreeShape } from "./tree";
import { verify } from "./verify";

export type { DraftRequest } from "./ssm";

/** The default tree, chosen by measurement (BENCHMARKS.md, bench:cpu widened pair at
 *  TinyLlama-1.1B cost, 2 CPU threads): the 3-token chain gave 52.7 tok/s (2.4x
 *  incremental), dynamic:6 49.7, 1,1,1,1,1,1 42.3, SpecInfer's 1,1,3,1,1,1,1,1 18.8:
 *  on 2 cores a 4-token verify costs about one decode step, a 21-token one three. */
export const DEFAULT_TREE = "1,1,1";

/** Prompt-lookup settings: continuation length and branches. */
const NGRAM = { maxN: 3, minN: 1, length: 8, branches: 2 };

/** One request's merged tree for one step. */
export class StepDraft {
  constructor(private readonly tree: TokenTree, private readonly vocab: number) {}

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

  /** `rows`: the LLM's logits at the root and every node, in linearize order. */
  verify(rows: Float32Array, params: SamplingParams, rng: Rng, context: readonly number[]) {
    const r = verify(this.tree, rows, this.vocab, { params, rng, context });
    return { acceptedNodes: r.accepted, tokens: r.tokens };
  }
}

export interface SpeculationOptions {
  ssms: LlamaModel[];
  /** Static widths ("1,1,3,1,1" or [1,1,3,1,1]) or "dynamic:N"; default DEFAULT_TREE. */
  tree?: string | number[];
  ngram: boolean;
}

export class Speculator {
  readonly shape: TreeShape;
  /** Most nodes a merged tree can have. */
  readonly maxNodes: number;
  private readonly ssms: SSMDrafter[];
  private readonly ngrams = new Map<number, NgramDrafter>();

  constructor(
    maxSeqs: number,
    maxSeqLen: number,
    private readonly vocab: number,
    /** Rows one LLM forward can verify (its token and logits limits). */
    maxTreeRows: number,
    private readonly opts: SpeculationOptions,
  ) {
    this.shape = parseTreeShape(Array.isArray(opts.tree) ? opts.tree.join(",") : (opts.tree ?? DEFAULT_TREE));
    const growth = growthCapacity(this.shape);
    for (const m of opts.ssms) {
      if (m.config.vocabSize !== vocab) throw new Error(`draft model vocabulary (${m.config.vocabSize}) differs from the LLM's (${vocab})`);
    }
    this.ssms = opts.ssms.map((m) => new SSMDrafter(m, maxSeqs, maxSeqLen, growth));
    this.maxNodes = opts.ssms.length * shapeCapacity(this.shape) + (opts.ngram ? NGRAM.length * NGRAM.branches : 0);
    if (this.maxNodes + 1 > maxTreeRows) {
      throw new Error(`a merged tree may have ${this.maxNodes} nodes; one forward verifies at most ${maxTreeRows - 1} (use a smaller tree or fewer drafters)`);
    }
  }

  /** The SSMs' KV caches (tests check they drain). */
  get caches(): KVCache[] {
    return this.ssms.map((s) => s.kv);
  }

  open(request: number): void {
    for (const s of this.ssms) s.open(request);
    if (this.opts.ngram) this.ngrams.set(request, new NgramDrafter(NGRAM));
  }

  close(request: number): void {
    for (const s of this.ssms) s.close(request);
    this.ngrams.delete(request);
  }

  closeAll(): void {
    for (const s of this.ssms) s.closeAll();
    this.ngrams.clear();
  }

  /** One merged tree per request (null when no drafter proposed anything). */
  draft(requests: DraftRequest[]): (StepDraft | null)[] {
    const perSSM = this.ssms.map((s) => s.draft(requests, this.shape));
    return requests.map((r, i) => {
      const trees: DraftTree[] = perSSM.map((trees) => trees[i]);
      const ngram = this.ngrams.get(r.request);
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
    for (const s of this.ssms) s.accept(request, newTokens);
  }
}

/** A speculator shaped for `llm`: trees small enough for one of its forwards. */
export function createSpeculator(llm: LlamaModel, maxSeqs: number, opts: SpeculationOptions): Speculator {
  const c = llm.config;
  return new Speculator(maxSeqs, c.maxPositionEmbeddings, c.vocabSize, Math.min(llm.maxBatchTokens, llm.maxLogitRows), opts);
}

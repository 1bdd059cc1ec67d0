// An SSM drafter: any loaded model drafts token trees for the LLM with its own paged
// KV cache. All sequences grow their trees together, one SSM forward per depth:
//
//   catch up:  feed each sequence's tokens not yet in the SSM cache, the root (last
//              token) included, and commit all but the root; the root stays at
//              uncommitted index 0 and its logits give the depth-1 distribution;
//   depth d:   feed the nodes whose children are wanted; node j of the growing tree
//              sits at uncommitted index 1 + j and attends to the root and its
//              ancestors;
//   accept:    after verification, commit the root and the accepted tokens this SSM
//              had fed, drop the rest; unfed tokens are caught up next step. A draft
//              that is never verified is dropped with accept(request, []).

import { createKVCache, type KVCache } from "../kv/cache";
import { BatchBuilder } from "../model/batch";
import type { CausalLM } from "../model/causal-lm";
import { draftParams, growTree, type DraftView, type ExpandedTree } from "./expand";
import type { Rng } from "./rng";
import { processLogits, type SamplingParams } from "./sampling";
import { pathTo, type TreeShape } from "./tree";

export interface DraftRequest {
  request: number;
  /** How this request's tree grows this step. */
  shape: TreeShape;
  /** Children drawn from q (stochastic verification) or the most likely ones. */
  sample: boolean;
  /** Prompt + generated tokens; the last one is the root of the tree. */
  tokens: readonly number[];
  params: SamplingParams;
  rng: Rng;
}

interface SequenceState {
  row: number;
  /** The tree grown this step (all of it: dynamic trees prune only their result). */
  view: DraftView | null;
  /** Growth ids whose K/V this SSM wrote (they were fed to get their children). */
  fed: Set<number>;
}

export class SSMDrafter {
  readonly kv: KVCache;
  private readonly seqs = new Map<number, SequenceState>();

  constructor(
    readonly model: CausalLM,
    maxSeqs: number,
    maxSeqLen: number,
    /** Most nodes one tree may grow (its uncommitted slots). */
    readonly maxGrowth: number,
  ) {
    if (maxGrowth + 1 > model.maxWords * 32) {
      throw new Error(`a draft tree may grow ${maxGrowth} nodes; the draft model's masks hold at most ${model.maxWords * 32 - 1}`);
    }
    // Every row may grow a large tree; the pool holds full sequences with a modest one.
    const typical = Math.min(maxGrowth, 64);
    this.kv = createKVCache(model, { maxSeqs, maxSeqLen: maxSeqLen + 1 + maxGrowth, numBlocks: maxSeqs * Math.ceil((maxSeqLen + 1 + typical) / 16) });
  }

  open(request: number): void {
    this.seqs.set(request, { row: this.kv.openSequence(), view: null, fed: new Set() });
  }

  close(request: number): void {
    const s = this.seqs.get(request);
    if (!s) return;
    this.kv.closeSequence(s.row);
    this.seqs.delete(request);
  }

  closeAll(): void {
    for (const id of [...this.seqs.keys()]) this.close(id);
    this.kv.close();
  }

  /** One tree per request, grown in lockstep: one SSM forward per depth for all. */
  draft(requests: DraftRequest[]): ExpandedTree[] {
    const rootLogits = this.catchUp(requests);
    const states = requests.map((r) => this.state(r.request));
    const growths = requests.map((r) => growTree(r.shape, { sample: r.sample, rng: r.rng }));
    const results: ExpandedTree[] = new Array(requests.length);
    let steps = growths.map((g) => g.next());
    for (;;) {
      const asking: { i: number; nodes: number[] }[] = [];
      steps.forEach((step, i) => {
        if (step.done) results[i] = step.value;
        else {
          states[i].view = step.value.view;
          asking.push({ i, nodes: step.value.nodes });
        }
      });
      if (asking.length === 0) break;
      const dists = this.distributions(asking, requests, states, rootLogits);
      const next = [...steps];
      asking.forEach((a, k) => (next[a.i] = growths[a.i].next(dists[k])));
      steps = next;
    }
    return results;
  }

  /** Tokens appended to a request after verification: keep the root and what this
   *  SSM fed along them. */
  accept(request: number, newTokens: readonly number[]): void {
    const s = this.state(request);
    const committed = this.kv.committed(s.row);
    const kept: number[] = [];
    if (s.view && newTokens.length > 0) {
      kept.push(committed);
      // The last new token is the next root: it is fed again as such.
      let node = -1;
      for (const t of newTokens.slice(0, -1)) {
        const { tokens, parents } = s.view;
        let child = -1;
        for (let j = 0; j < tokens.length; j++) {
          if (parents[j] === node && tokens[j] === t && s.fed.has(j)) {
            child = j;
            break;
          }
        }
        if (child < 0) break;
        kept.push(committed + 1 + child);
        node = child;
      }
    }
    this.kv.commit(s.row, kept);
    s.view = null;
    s.fed.clear();
  }

  /** Tokens a draft would feed to catch up a request now holding `tokens` tokens. */
  catchUpTokens(request: number, tokens: number): number {
    return tokens - this.kv.committed(this.state(request).row);
  }

  /** Feeds every request's tokens that are not in the cache yet, in chunks that fit
   *  a forward, commits them, and returns each root's logits. */
  private catchUp(requests: DraftRequest[]): Float32Array[] {
    const vocab = this.model.config.vocabSize;
    const roots: Float32Array[] = new Array(requests.length);
    let todo = requests.map((_, i) => i);
    while (todo.length > 0) {
      const builder = new BatchBuilder(this.model.maxWords);
      const fed: { i: number; count: number; last: boolean }[] = [];
      let budget = this.model.maxBatchTokens;
      for (const i of todo) {
        const r = requests[i];
        const row = this.state(r.request).row;
        const committed = this.kv.committed(row);
        const remaining = r.tokens.length - committed;
        const count = Math.min(remaining, budget);
        if (count <= 0) break;
        budget -= count;
        this.kv.reserve(row, count);
        const last = count === remaining;
        builder.addChain(row, committed, r.tokens.slice(committed, committed + count), committed, last ? "last" : "none");
        fed.push({ i, count, last });
      }
      const logits = this.model.forward(builder.build(), this.kv);
      let logitRow = 0;
      for (const f of fed) {
        const row = this.state(requests[f.i].request).row;
        // The root stays uncommitted (its K/V kept): it heads the tree.
        this.kv.commitPrefix(row, f.last ? f.count - 1 : f.count);
        if (f.last) roots[f.i] = logits.slice(logitRow * vocab, ++logitRow * vocab);
      }
      todo = todo.filter((i) => roots[i] === undefined);
    }
    return roots;
  }

  /** Next-token distributions at the asked nodes: the root's from the catch-up pass,
   *  the others from forwards that feed those nodes (one, unless they overflow it). */
  private distributions(
    asking: { i: number; nodes: number[] }[],
    requests: DraftRequest[],
    states: SequenceState[],
    rootLogits: Float32Array[],
  ): Float32Array[][] {
    const vocab = this.model.config.vocabSize;
    const limit = Math.min(this.model.maxBatchTokens, this.model.maxLogitRows);
    const words = Math.max(1, Math.ceil((this.maxGrowth + 1) / 32));
    const out = asking.map((a) => new Array<Float32Array>(a.nodes.length));
    let builder = new BatchBuilder(words);
    let waiting: { k: number; n: number }[] = [];
    const flush = () => {
      const logits = this.model.forward(builder.build(), this.kv);
      waiting.forEach((w, row) => (out[w.k][w.n] = this.process(logits.subarray(row * vocab, (row + 1) * vocab), requests[asking[w.k].i])));
      builder = new BatchBuilder(words);
      waiting = [];
    };
    asking.forEach((a, k) => {
      const s = states[a.i];
      const committed = this.kv.committed(s.row);
      a.nodes.forEach((node, n) => {
        if (node < 0) {
          out[k][n] = this.process(rootLogits[a.i], requests[a.i]);
          return;
        }
        // Uncommitted index 0 is the root (position committed); node j is at 1 + j.
        const path = pathTo(s.view!.parents, node);
        this.kv.reserve(s.row, node + 2);
        builder.addNode(s.row, committed, s.view!.tokens[node], committed + path.length, node + 1, [0, ...path.map((j) => j + 1)], true);
        s.fed.add(node);
        waiting.push({ k, n });
        if (builder.size === limit) flush();
      });
    });
    if (builder.size > 0) flush();
    return out;
  }

  private process(logits: Float32Array, r: DraftRequest): Float32Array {
    return processLogits(logits, draftParams(r.params), r.tokens);
  }

  private state(request: number): SequenceState {
    const s = this.seqs.get(request);
    if (!s) throw new Error(`SSM drafter: request ${request} is not open`);
    return s;
  }
}

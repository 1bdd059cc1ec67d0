// An SSM drafter: any loaded model drafts token trees for the LLM with its own paged
// KV cache. All sequences grow their trees together, one SSM forward per depth:
//
//   catch up:  feed each sequence's tokens not yet in the SSM cache (the root last)
//              and commit them; the root's logits give the depth-1 distribution;
//   depth d:   feed the nodes whose children are wanted; node j of the growing tree
//              sits at uncommitted slot j and attends to its ancestors' slots;
//   accept:    after verification, keep the slots of the accepted tokens that this
//              SSM had fed and drop the rest; unfed tokens are caught up next step.

import type { KVCache } from "../kv/cache";
import { BatchBuilder } from "../model/batch";
import type { LlamaModel } from "../model/llama";
import { draftParams, growTree, type DraftView, type ExpandedTree } from "./expand";
import type { Rng } from "./rng";
import { isGreedy, processLogits, type SamplingParams } from "./sampling";
import { pathTo, type TreeShape } from "./tree";

export interface DraftRequest {
  request: number;
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
    readonly model: LlamaModel,
    maxSeqs: number,
    maxSeqLen: number,
    /** Most nodes one tree may grow (its uncommitted slots). */
    readonly maxGrowth: number,
  ) {
    this.kv = model.createKVCache({ maxSeqs, maxSeqLen: maxSeqLen + maxGrowth });
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
  draft(requests: DraftRequest[], shape: TreeShape): ExpandedTree[] {
    const rootLogits = this.catchUp(requests);
    const states = requests.map((r) => this.state(r.request));
    const growths = requests.map((r) => growTree(shape, { sample: !isGreedy(r.params), rng: r.rng }));
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

  /** Tokens appended to a request after verification: keep what this SSM fed. */
  accept(request: number, newTokens: readonly number[]): void {
    const s = this.state(request);
    const committed = this.kv.committed(s.row);
    const kept: number[] = [];
    if (s.view) {
      let node = -1;
      // The last new token is the next root: it is always fed again (catchUp needs
      // its logits), even if this SSM happened to draft it.
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
        kept.push(committed + child);
        node = child;
      }
    }
    this.kv.commit(s.row, kept);
    s.view = null;
    s.fed.clear();
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
        const committed = this.kv.committed(row);
        this.kv.commit(row, Array.from({ length: f.count }, (_, k) => committed + k));
        if (f.last) roots[f.i] = logits.slice(logitRow * vocab, ++logitRow * vocab);
      }
      todo = todo.filter((i) => roots[i] === undefined);
    }
    return roots;
  }

  /** Next-token distributions at the asked nodes: the root's from the catch-up pass,
   *  the others from one forward that feeds those nodes. */
  private distributions(
    asking: { i: number; nodes: number[] }[],
    requests: DraftRequest[],
    states: SequenceState[],
    rootLogits: Float32Array[],
  ): Float32Array[][] {
    const builder = new BatchBuilder(Math.max(1, Math.ceil(this.maxGrowth / 32)));
    for (const a of asking) {
      const s = states[a.i];
      const committed = this.kv.committed(s.row);
      for (const node of a.nodes) {
        if (node < 0) continue;
        const path = pathTo(s.view!.parents, node);
        this.kv.reserve(s.row, node + 1);
        // The root sits at position committed - 1; a node at depth d at committed - 1 + d.
        builder.addNode(s.row, committed, s.view!.tokens[node], committed - 1 + path.length, node, path, true);
        s.fed.add(node);
      }
    }
    const vocab = this.model.config.vocabSize;
    const logits = builder.size > 0 ? this.model.forward(builder.build(), this.kv) : new Float32Array(0);
    let logitRow = 0;
    return asking.map((a) => {
      const r = requests[a.i];
      const params = draftParams(r.params);
      return a.nodes.map((node) => {
        const row = node < 0 ? rootLogits[a.i] : logits.subarray(logitRow * vocab, ++logitRow * vocab);
        return processLogits(row, params, r.tokens);
      });
    });
  }

  private state(request: number): SequenceState {
    const s = this.seqs.get(request);
    if (!s) throw new Error(`SSM drafter: request ${request} is not open`);
    return s;
  }
}

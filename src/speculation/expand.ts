// Growing a drafter's token tree from its next-token distributions, without knowing
// the model behind them: the caller computes the distributions of a whole depth of
// nodes (of one or many sequences) in one batched forward.

import type { Rng } from "./rng.ts";
import { isGreedy, topIndices, type SamplingParams } from "./sampling.ts";
import { shapeCapacity, type DraftTree, type TreeShape } from "./tree.ts";

/** The tree grown so far: node ids are indices into these arrays (parents first). */
export interface DraftView {
  readonly tokens: readonly number[];
  readonly parents: readonly number[];
}

/** The drafter's processed next-token distribution at each of `nodes` (-1 = the root),
 *  in the same order. Every node passed is already in `draft`. */
export type NextDistributions = (nodes: number[], draft: DraftView) => Float32Array[];

/** What a growing tree asks for: the distributions at `nodes` (ids into `view`). */
export interface GrowthRequest {
  nodes: number[];
  view: DraftView;
}

/** A tree growing one depth per step: each yield asks for the distributions at some
 *  nodes, `next(distributions)` answers in the same order, and the return value is the
 *  finished tree. Several sequences' growths can be stepped in lockstep, one batched
 *  forward per depth for all of them. */
export type TreeGrowth = Generator<GrowthRequest, ExpandedTree, Float32Array[]>;

export interface ExpandOptions {
  /** true: children drawn from q without replacement (needs `rng`); false: the most
   *  likely children, deterministically. */
  sample: boolean;
  rng?: Rng;
}

/** Beside the DraftTree: each node's id during growth, i.e. in the views and node lists
 *  the drafter was asked about (dynamic trees are pruned and renumbered at the end). */
export interface ExpandedTree extends DraftTree {
  expandIds: Int32Array;
}

/** Sampling parameters a drafter should process its logits with. Sampling: the LLM's
 *  own (the closer q is to p, the more is accepted). Greedy: plain softmax, since only
 *  the ranking of children matters and a one-hot row would rank nothing. */
export function draftParams(llm: SamplingParams): SamplingParams {
  return isGreedy(llm) ? { ...llm, temperature: 1, topK: 0, topP: 1, minP: 0 } : llm;
}

/** Up to `count` distinct tokens drawn one by one from q, each drawn token removed
 *  and the rest renormalized: the order verification replays. */
export function drawWithoutReplacement(q: Float32Array, count: number, rng: Rng): number[] {
  const drawn: number[] = [];
  const skipped: number[] = []; // drawn tokens, ascending: skipped in the scan below
  let remaining = 0;
  for (let i = 0; i < q.length; i++) remaining += q[i];
  while (drawn.length < count && remaining > 0) {
    const target = rng.next() * remaining;
    let cumulative = 0;
    let pick = -1;
    let nextSkipped = 0;
    for (let i = 0; i < q.length; i++) {
      if (i === skipped[nextSkipped]) {
        nextSkipped++;
        continue;
      }
      if (q[i] <= 0) continue;
      pick = i;
      cumulative += q[i];
      if (target < cumulative) break;
    }
    if (pick < 0) break; // only rounding residue was left
    drawn.push(pick);
    const at = skipped.findIndex((t) => t > pick);
    skipped.splice(at < 0 ? skipped.length : at, 0, pick);
    remaining -= q[pick];
  }
  return drawn;
}

function mostLikely(q: Float32Array, count: number): number[] {
  return Array.from(topIndices(q, count)).filter((token) => q[token] > 0);
}

/** The rng to draw children with; undefined when children are chosen by rank. */
function samplingRng(options: ExpandOptions): Rng | undefined {
  if (!options.sample) return undefined;
  if (!options.rng) throw new Error("expand: sampling children needs an rng");
  return options.rng;
}

/** Starts growing one drafter's tree (see TreeGrowth). */
export function growTree(shape: TreeShape, options: ExpandOptions): TreeGrowth {
  const rng = samplingRng(options);
  return shape.kind === "static" ? growStatic(shape.widths, rng) : growDynamic(shape.budget, shape.maxDepth, shape.width, rng);
}

/** Grows one drafter's tree; `nextDistributions` is called once per depth. */
export function expandTree(shape: TreeShape, nextDistributions: NextDistributions, options: ExpandOptions): ExpandedTree {
  const growth = growTree(shape, options);
  let step = growth.next();
  while (!step.done) step = growth.next(nextDistributions(step.value.nodes, step.value.view));
  return step.value;
}

/** Most nodes a growth can create before pruning (the ids a drafter may see): a
 *  dynamic tree expands at most budget - 1 nodes per depth below the root. */
export function growthCapacity(shape: TreeShape): number {
  return shape.kind === "static" ? shapeCapacity(shape) : shape.width * (1 + (shape.maxDepth - 1) * (shape.budget - 1));
}

/** Asks for the distributions at `nodes` and checks the answer. */
function* ask(nodes: number[], view: DraftView): Generator<GrowthRequest, Float32Array[], Float32Array[]> {
  const dists = yield { nodes, view };
  if (!dists || dists.length !== nodes.length) {
    throw new Error(`expand: ${dists?.length ?? 0} distributions given for ${nodes.length} nodes`);
  }
  return dists;
}

/** Every node at depth d gets widths[d] children (fewer where q has less support). */
function* growStatic(widths: number[], rng: Rng | undefined): TreeGrowth {
  const tokens: number[] = [];
  const parents: number[] = [];
  const q: Float32Array[] = [];
  let level = [-1];
  for (const width of widths) {
    if (level.length === 0) break;
    const dists = yield* ask(level, { tokens, parents });
    const next: number[] = [];
    level.forEach((node, k) => {
      const dist = dists[k];
      const chosen = rng ? drawWithoutReplacement(dist, width, rng) : mostLikely(dist, width);
      for (const token of chosen) {
        next.push(tokens.length);
        tokens.push(token);
        parents.push(node);
        q.push(dist);
      }
    });
    level = next;
  }
  const ids = Int32Array.from(tokens, (_, i) => i);
  return { tokens: Int32Array.from(tokens), parents: Int32Array.from(parents), q, sampled: rng !== undefined, expandIds: ids };
}

/** Best-first growth to `budget` nodes, one depth per request.
 *
 *  Each node has a score that never exceeds its parent's, and the tree returned is the
 *  top-`budget` nodes by (score desc, creation order asc) of the full width-ary tree
 *  of depth maxDepth: closed under ancestors, and only nodes that can still make that
 *  cut are expanded. Deterministic children: score = path probability.
 *
 *  Sampled children: a child's score must not depend on the token drawn, or keeping
 *  the likelier draws would bias the kept children away from q and verification would
 *  no longer be lossless. The j-th draw of a node scores min(parent score, parent path
 *  probability * j-th largest q), known before the draw; siblings are then kept as a
 *  prefix of their draw order, and whether a child is kept depends only on nodes
 *  outside its own subtree. */
function* growDynamic(budget: number, maxDepth: number, width: number, rng: Rng | undefined): TreeGrowth {
  const tokens: number[] = [];
  const parents: number[] = [];
  const q: Float32Array[] = [];
  const pathProb: number[] = [];
  const score: number[] = [];
  const ranksAhead = (a: number, b: number) => score[b] - score[a] || a - b;
  let level = [-1];
  for (let depth = 0; depth < maxDepth && level.length > 0; depth++) {
    const dists = yield* ask(level, { tokens, parents });
    const created: number[] = [];
    level.forEach((node, k) => {
      const dist = dists[k];
      const parentPath = node < 0 ? 1 : pathProb[node];
      const parentScore = node < 0 ? 1 : score[node];
      const best = mostLikely(dist, width);
      const chosen = rng ? drawWithoutReplacement(dist, width, rng) : best;
      chosen.forEach((token, j) => {
        created.push(tokens.length);
        tokens.push(token);
        parents.push(node);
        q.push(dist);
        pathProb.push(parentPath * dist[token]);
        score.push(rng ? Math.min(parentScore, parentPath * dist[best[j]]) : parentPath * dist[token]);
      });
    });
    // A node's descendants rank behind it, so only a node within the top budget - 1
    // can still have one in the final cut. `created` stays in creation order.
    if (tokens.length < budget) {
      level = created;
    } else {
      const ranked = Array.from(tokens, (_, i) => i).sort(ranksAhead);
      const rank = new Int32Array(tokens.length);
      ranked.forEach((node, r) => (rank[node] = r));
      level = created.filter((node) => rank[node] < budget - 1);
    }
  }
  const kept = Array.from(tokens, (_, i) => i)
    .sort(ranksAhead)
    .slice(0, budget)
    .sort((a, b) => a - b);
  const newId = new Map<number, number>();
  kept.forEach((node, i) => newId.set(node, i));
  return {
    tokens: Int32Array.from(kept, (node) => tokens[node]),
    parents: Int32Array.from(kept, (node) => (parents[node] < 0 ? -1 : newId.get(parents[node])!)),
    q: kept.map((node) => q[node]),
    sampled: rng !== undefined,
    expandIds: Int32Array.from(kept),
  };
}

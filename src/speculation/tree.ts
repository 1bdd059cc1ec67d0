// Token trees: what a drafter proposes (DraftTree), the trie of all drafters' proposals
// that the LLM verifies (TokenTree), its layout in a TokenBatch, and tree shapes.

import type { BatchBuilder } from "../model/batch.ts";

/** One drafter's proposal. Parents come before children; siblings appear in the order
 *  the drafter drew or ranked them (verification replays that order). */
export interface DraftTree {
  tokens: Int32Array;
  /** Index of each node's parent; -1 = child of the root (the last committed token). */
  parents: Int32Array;
  /** Per node: the drafter's processed next-token distribution at the node's parent,
   *  the one the node was drawn from (siblings share one array); null or absent when
   *  the drafter has none (n-gram). */
  q?: (Float32Array | null)[];
  /** true: siblings were drawn from q without replacement, in array order;
   *  false: chosen deterministically (top-k, greedy, n-gram). */
  sampled: boolean;
}

/** One drafter's proposal of one child: verification checks it against `q` when
 *  `sampled`, as a point-mass proposal otherwise. */
export interface Draw {
  /** Node id of the proposed child in the TokenTree. */
  child: number;
  drafter: number;
  q: Float32Array | null;
  sampled: boolean;
}

/** The merged trie, nodes numbered in DFS order (the root, id -1, is implicit). */
export interface TokenTree {
  size: number;
  tokens: Int32Array;
  /** -1 = child of the root. */
  parents: Int32Array;
  /** Child of the root = 1. */
  depths: Int32Array;
  /** children[parent + 1]: child ids, first by drafter, then in that drafter's order. */
  children: number[][];
  /** draws[parent + 1]: every drafter's proposals at that parent, drafter by drafter,
   *  each in its draw order. A token proposed by two drafters appears twice. */
  draws: Draw[][];
}

function checkDraft(tree: DraftTree, drafter: number): void {
  const n = tree.tokens.length;
  const where = `draft tree of drafter ${drafter}`;
  if (tree.parents.length !== n) throw new Error(`${where}: ${n} tokens but ${tree.parents.length} parents`);
  if (tree.q && tree.q.length !== n) throw new Error(`${where}: ${n} tokens but ${tree.q.length} q entries`);
  for (let i = 0; i < n; i++) {
    if (tree.parents[i] < -1 || tree.parents[i] >= i) {
      throw new Error(`${where}: node ${i} has parent ${tree.parents[i]}; parents must come before children`);
    }
  }
}

/** Merges drafters' trees into one trie (drafter index = position in `trees`). */
export function mergeTrees(trees: DraftTree[]): TokenTree {
  // Trie under construction; trie node 0 is the root, draft node ids map to t >= 1.
  const tokens: number[] = [-1];
  const children: number[][] = [[]];
  const byToken: Map<number, number>[] = [new Map()];
  const draws: Draw[][] = [[]];
  trees.forEach((tree, drafter) => {
    checkDraft(tree, drafter);
    const trieNode = new Int32Array(tree.tokens.length);
    for (let i = 0; i < tree.tokens.length; i++) {
      const parent = tree.parents[i] < 0 ? 0 : trieNode[tree.parents[i]];
      const token = tree.tokens[i];
      let node = byToken[parent].get(token);
      if (node === undefined) {
        node = tokens.length;
        tokens.push(token);
        children.push([]);
        byToken.push(new Map());
        draws.push([]);
        children[parent].push(node);
        byToken[parent].set(token, node);
      }
      trieNode[i] = node;
      const q = tree.q?.[i] ?? null;
      const sampled = tree.sampled && q !== null;
      const mine = draws[parent].filter((draw) => draw.drafter === drafter);
      if (mine.some((draw) => draw.child === node)) {
        // Sampling without replacement never repeats a token; a ranked list may.
        if (sampled) throw new Error(`draft tree of drafter ${drafter}: node ${i} repeats token ${token} among sampled siblings`);
        continue;
      }
      if (sampled && mine.length > 0 && mine[0].q !== q) {
        throw new Error(`draft tree of drafter ${drafter}: sampled siblings of node ${i} must share one q array`);
      }
      draws[parent].push({ child: node, drafter, q, sampled });
    }
  });

  // Renumber in DFS order (children in insertion order), root excluded.
  const size = tokens.length - 1;
  const id = new Int32Array(tokens.length).fill(-1);
  const order: number[] = [];
  const stack = [...children[0]].reverse();
  while (stack.length > 0) {
    const node = stack.pop()!;
    id[node] = order.length;
    order.push(node);
    for (let c = children[node].length - 1; c >= 0; c--) stack.push(children[node][c]);
  }
  const parentOf = new Int32Array(tokens.length);
  for (let node = 0; node < tokens.length; node++) for (const child of children[node]) parentOf[child] = node;
  const merged: TokenTree = {
    size,
    tokens: new Int32Array(size),
    parents: new Int32Array(size),
    depths: new Int32Array(size),
    children: [],
    draws: [],
  };
  const renumber = (node: number) => {
    merged.children.push(children[node].map((child) => id[child]));
    merged.draws.push(draws[node].map((draw) => ({ ...draw, child: id[draw.child] })));
  };
  renumber(0);
  order.forEach((node, i) => {
    const parent = id[parentOf[node]];
    merged.tokens[i] = tokens[node];
    merged.parents[i] = parent;
    merged.depths[i] = parent < 0 ? 1 : merged.depths[parent] + 1;
    renumber(node);
  });
  return merged;
}

/** Ancestor-mask words a BatchBuilder needs for a tree of `size` nodes plus its root. */
export function maskWords(size: number): number {
  return Math.ceil((size + 1) / 32);
}

export interface TreePlacement {
  /** KV-cache sequence row. */
  seqRow: number;
  /** Slots already committed in that row's cache. */
  committed: number;
  /** The last accepted token, whose K/V is not in the cache yet. */
  rootToken: number;
  rootPosition: number;
}

/** Adds the root then every node in DFS order, all wanting logits. The row's batch
 *  tokens are [root, node 0, node 1, ...]: node i has slot committed + 1 + i and logits
 *  row (among this tree's rows) 1 + i. Returns the root's batch index. */
export function linearize(tree: TokenTree, at: TreePlacement, builder: BatchBuilder): number {
  const root = builder.add(at.seqRow, at.committed, at.rootToken, at.rootPosition, -1, true);
  for (let i = 0; i < tree.size; i++) {
    const parent = tree.parents[i] < 0 ? root : root + 1 + tree.parents[i];
    builder.add(at.seqRow, at.committed, tree.tokens[i], at.rootPosition + tree.depths[i], parent, true);
  }
  return root;
}

/** Node ids from the root to `node`, inclusive. */
export function pathTo(parents: ArrayLike<number>, node: number): number[] {
  const path: number[] = [];
  for (let at = node; at >= 0; at = parents[at]) path.push(at);
  return path.reverse();
}

/** How drafters grow trees: fixed widths per depth (SpecInfer), or best-first by path
 *  probability up to a node budget (EAGLE-2 style). */
export type TreeShape =
  | { kind: "static"; /** widths[d]: children of each node at depth d (root = 0) */ widths: number[] }
  | { kind: "dynamic"; budget: number; maxDepth: number; /** children per expanded node */ width: number };

const DYNAMIC_DEFAULT_DEPTH = 8;
const DYNAMIC_DEFAULT_WIDTH = 4;

/** Parses "1,1,3,1,1" (static widths) or "dynamic:BUDGET[:MAXDEPTH[:WIDTH]]". */
export function parseTreeShape(text: string): TreeShape {
  const fail = (why: string): never => {
    throw new Error(`tree shape "${text}": ${why}`);
  };
  const positive = (part: string, what: string): number => {
    const trimmed = part.trim();
    if (!/^\d+$/.test(trimmed) || Number(trimmed) < 1) fail(`${what} must be a positive integer, got "${part}"`);
    return Number(trimmed);
  };
  const spec = text.trim();
  if (spec.startsWith("dynamic")) {
    const parts = spec.split(":");
    if (parts[0] !== "dynamic" || parts.length < 2 || parts.length > 4) {
      fail('expected "dynamic:BUDGET", "dynamic:BUDGET:MAXDEPTH" or "dynamic:BUDGET:MAXDEPTH:WIDTH"');
    }
    return {
      kind: "dynamic",
      budget: positive(parts[1], "the node budget"),
      maxDepth: parts.length > 2 ? positive(parts[2], "the maximum depth") : DYNAMIC_DEFAULT_DEPTH,
      width: parts.length > 3 ? positive(parts[3], "the width") : DYNAMIC_DEFAULT_WIDTH,
    };
  }
  if (spec === "") fail('empty; expected widths per depth like "1,1,3,1" or "dynamic:32"');
  return { kind: "static", widths: spec.split(",").map((part, depth) => positive(part, `the width at depth ${depth}`)) };
}

/** The most nodes (root excluded) a tree of this shape can have. */
/** SSM passes that grow a tree of this shape (one per depth). */
export function shapeDepth(shape: TreeShape): number {
  return shape.kind === "static" ? shape.widths.length : shape.maxDepth;
}

export function shapeCapacity(shape: TreeShape): number {
  if (shape.kind === "dynamic") return shape.budget;
  let level = 1;
  let total = 0;
  for (const width of shape.widths) {
    level *= width;
    total += level;
  }
  return total;
}

// Tree expansion from a drafter's distributions, and the n-gram drafter.

import { describe, expect, test } from "bun:test";
import { drawWithoutReplacement, expandTree, growTree, growthCapacity, type DraftView } from "../../src/speculation/expand.ts";
import { NgramDrafter, promptLookup } from "../../src/speculation/ngram.ts";
import { Rng } from "../../src/speculation/rng.ts";
import { processLogits, samplingParams } from "../../src/speculation/sampling.ts";
import { parseTreeShape, pathTo, type DraftTree } from "../../src/speculation/tree.ts";
import { ToyModel, chiSquareFit } from "./toy.ts";

const VOCAB = 12;
const model = new ToyModel(VOCAB, 17, 2.5);
const params = samplingParams({ temperature: 1 });

/** The drafter's distributions at nodes, recording every call. */
function drafter(calls: number[][]) {
  return (nodes: number[], view: DraftView) => {
    calls.push(nodes);
    return nodes.map((node) => {
      expect(node).toBeLessThan(view.tokens.length);
      return processLogits(model.logits(node < 0 ? [] : pathTo(view.parents, node).map((n) => view.tokens[n])), params);
    });
  };
}

function pathProb(tree: DraftTree, node: number): number {
  return pathTo(tree.parents, node).reduce((p, n) => p * tree.q![n]![tree.tokens[n]], 1);
}

describe("static expansion", () => {
  test("widths per depth, top-w children, one call per depth", () => {
    const calls: number[][] = [];
    const tree = expandTree(parseTreeShape("2,1,3"), drafter(calls), { sample: false });
    expect(calls.map((c) => c.length)).toEqual([1, 2, 2]);
    expect(tree.tokens.length).toBe(2 + 2 + 6);
    expect(tree.sampled).toBe(false);
    const rootQ = tree.q![0]!;
    const ranked = Array.from(rootQ.keys()).sort((a, b) => rootQ[b] - rootQ[a]);
    expect([tree.tokens[0], tree.tokens[1]]).toEqual(ranked.slice(0, 2));
    expect(Array.from(tree.expandIds)).toEqual(Array.from(tree.tokens.keys()));
  });

  test("sampled children are distinct and need an rng", () => {
    const tree = expandTree(parseTreeShape("4,2"), drafter([]), { sample: true, rng: new Rng(1) });
    expect(tree.sampled).toBe(true);
    for (let parent = -1; parent < tree.tokens.length; parent++) {
      const siblings = Array.from(tree.tokens).filter((_, i) => tree.parents[i] === parent);
      expect(new Set(siblings).size).toBe(siblings.length);
    }
    expect(() => expandTree(parseTreeShape("2"), drafter([]), { sample: true })).toThrow("needs an rng");
  });

  test("a wrong number of distributions is refused", () => {
    expect(() => expandTree(parseTreeShape("1"), () => [], { sample: false })).toThrow("0 distributions given for 1 nodes");
  });
});

describe("drawWithoutReplacement", () => {
  test("first two draws follow q, then q without the first", () => {
    const q = Float32Array.from([0.4, 0.3, 0.2, 0.1]);
    const rng = new Rng(8);
    const counts = new Array(16).fill(0);
    for (let i = 0; i < 20_000; i++) {
      const [a, b] = drawWithoutReplacement(q, 2, rng);
      counts[a * 4 + b]++;
    }
    const expected = counts.map((_, cell) => {
      const [a, b] = [cell >> 2, cell & 3];
      return a === b ? 0 : q[a] * (q[b] / (1 - q[a]));
    });
    expect(chiSquareFit(counts, expected).pValue).toBeGreaterThan(1e-4);
  });

  test("stops at the support", () => {
    expect(drawWithoutReplacement(Float32Array.from([0, 1, 0]), 3, new Rng(2))).toEqual([1]);
  });
});

describe("dynamic expansion", () => {
  test("deterministic: the top-budget nodes by path probability of the full tree", () => {
    const calls: number[][] = [];
    const tree = expandTree(parseTreeShape("dynamic:10:4:3"), drafter(calls), { sample: false });
    expect(tree.tokens.length).toBe(10);
    expect(calls.length).toBeLessThanOrEqual(4);
    // Reference: the complete 3-ary tree of depth 4, ranked by path probability.
    const full = expandTree(parseTreeShape("3,3,3,3"), drafter([]), { sample: false });
    const best = Array.from(full.tokens.keys()).map((i) => pathProb(full, i)).sort((a, b) => b - a).slice(0, 10);
    const got = Array.from(tree.tokens.keys()).map((i) => pathProb(tree, i)).sort((a, b) => b - a);
    for (let i = 0; i < 10; i++) expect(got[i]).toBeCloseTo(best[i], 9);
    for (let i = 0; i < tree.tokens.length; i++) expect(tree.parents[i]).toBeLessThan(i);
  });

  test("sampled: ancestors kept, siblings kept as a prefix of their draw order", () => {
    for (let seed = 0; seed < 30; seed++) {
      const calls: number[][] = [];
      const tree = expandTree(parseTreeShape("dynamic:12:5:3"), drafter(calls), { sample: true, rng: new Rng(seed) });
      expect(tree.tokens.length).toBe(12);
      expect(tree.sampled).toBe(true);
      // Creation ids: siblings were created consecutively in draw order, so a kept
      // prefix means consecutive creation ids starting right after a parent's first.
      const byParent = new Map<number, number[]>();
      tree.parents.forEach((parent, i) => byParent.set(parent, [...(byParent.get(parent) ?? []), tree.expandIds[i]]));
      for (const ids of byParent.values()) ids.forEach((id, k) => k > 0 && expect(id).toBe(ids[k - 1] + 1));
      for (let i = 0; i < tree.tokens.length; i++) expect(tree.parents[i]).toBeLessThan(i);
    }
  });

  test("budget 1 expands only the root", () => {
    const calls: number[][] = [];
    const tree = expandTree(parseTreeShape("dynamic:1"), drafter(calls), { sample: false });
    expect(tree.tokens.length).toBe(1);
    expect(calls).toEqual([[-1]]);
  });
});

describe("growTree", () => {
  test("several sequences' trees grow in lockstep, as expandTree grows each alone", () => {
    for (const text of ["2,1,3", "dynamic:9:4:3", "dynamic:30:6:4"]) {
      const shape = parseTreeShape(text);
      const answer = drafter([]);
      const growths = [0, 1, 2].map((seed) => growTree(shape, { sample: true, rng: new Rng(seed) }));
      let steps = growths.map((growth) => growth.next());
      const views: DraftView[] = [];
      while (steps.some((step) => !step.done)) {
        steps = steps.map((step, k) => {
          if (step.done) return step;
          views[k] = step.value.view;
          return growths[k].next(answer(step.value.nodes, step.value.view));
        });
      }
      // The views are live: they end up holding every node grown, pruned ones included.
      for (const view of views) expect(view.tokens.length).toBeLessThanOrEqual(growthCapacity(shape));
      steps.forEach((step, seed) => expect(step.value).toEqual(expandTree(shape, answer, { sample: true, rng: new Rng(seed) })));
    }
  });
});

describe("n-gram drafter", () => {
  test("proposes what followed the most recent earlier match of the longest suffix", () => {
    // Suffix [1, 2, 3] occurred at 0 and 5; the most recent earlier one (5) is followed by 9, 9.
    const tree = promptLookup([1, 2, 3, 4, 0, 1, 2, 3, 9, 9, 7, 1, 2, 3], { length: 3 });
    expect(Array.from(tree.tokens)).toEqual([9, 9, 7]);
    expect(Array.from(tree.parents)).toEqual([-1, 0, 1]);
    expect(tree.sampled).toBe(false);
    expect(tree.q).toBeUndefined();
  });

  test("falls back to shorter suffixes, and to nothing", () => {
    expect(Array.from(promptLookup([5, 6, 7, 8, 6], { length: 2 }).tokens)).toEqual([7, 8]);
    expect(promptLookup([1, 2, 3]).tokens.length).toBe(0);
    expect(promptLookup([]).tokens.length).toBe(0);
  });

  test("several continuations become a tree sharing prefixes", () => {
    const tree = promptLookup([4, 1, 2, 4, 1, 3, 4, 1, 2, 5, 4, 1], { length: 2, branches: 3, maxN: 2 });
    // After [4, 1]: "2 5" (most recent), "3 4", then "2 4" shares the "2".
    expect(Array.from(tree.tokens)).toEqual([2, 5, 3, 4, 4]);
    expect(Array.from(tree.parents)).toEqual([-1, 0, -1, 2, 0]);
  });

  test("incremental pushes give the same drafts as a fresh index", () => {
    const rng = new Rng(4);
    const sequence = Array.from({ length: 600 }, () => Math.floor(rng.next() * 6));
    const incremental = new NgramDrafter({ branches: 2 });
    for (let end = 0; end < sequence.length; end += 37) {
      incremental.push(sequence.slice(incremental.length, end));
      expect(incremental.draft()).toEqual(promptLookup(sequence.slice(0, end), { branches: 2 }));
    }
  });

  test("bad options are refused", () => {
    expect(() => new NgramDrafter({ minN: 3, maxN: 2 })).toThrow("minN (3) exceeds maxN (2)");
    expect(() => new NgramDrafter({ length: 0 })).toThrow("length must be a positive integer");
  });
});

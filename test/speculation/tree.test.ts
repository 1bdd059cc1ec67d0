// Token trees: merging drafters' trees into one trie, its layout in a TokenBatch,
// and tree-shape parsing.

import { describe, expect, test } from "bun:test";
import { BatchBuilder } from "../../src/model/batch.ts";
import {
  linearize, maskWords, mergeTrees, parseTreeShape, pathTo, shapeCapacity, type DraftTree, type TokenTree,
} from "../../src/speculation/tree.ts";

function draft(tokens: number[], parents: number[], extra: Partial<DraftTree> = {}): DraftTree {
  return { tokens: Int32Array.from(tokens), parents: Int32Array.from(parents), sampled: false, ...extra };
}

/** Each node's token path from the root, e.g. "5.7". */
function paths(tree: TokenTree): string[] {
  return Array.from({ length: tree.size }, (_, i) => pathTo(tree.parents, i).map((n) => tree.tokens[n]).join("."));
}

describe("mergeTrees", () => {
  test("one trie, DFS order, children by drafter then by the drafter's order", () => {
    // Drafter 0: 5 -> {7, 8}, 6.  Drafter 1: 6 -> 9, 5 -> 7 -> 1.
    const a = draft([5, 6, 7, 8], [-1, -1, 0, 0]);
    const b = draft([6, 5, 9, 7, 1], [-1, -1, 0, 1, 3]);
    const tree = mergeTrees([a, b]);
    expect(paths(tree)).toEqual(["5", "5.7", "5.7.1", "5.8", "6", "6.9"]);
    expect(Array.from(tree.depths)).toEqual([1, 2, 3, 2, 1, 2]);
    expect(Array.from(tree.parents)).toEqual([-1, 0, 1, 0, -1, 4]);
    expect(tree.children[0]).toEqual([0, 4]);
    expect(tree.children[1]).toEqual([1, 3]);
    // Root proposals: drafter 0 in its order, then drafter 1 in its order.
    expect(tree.draws[0].map((d) => [d.drafter, tree.tokens[d.child]])).toEqual([[0, 5], [0, 6], [1, 6], [1, 5]]);
    expect(tree.draws[1].map((d) => [d.drafter, tree.tokens[d.child]])).toEqual([[0, 7], [0, 8], [1, 7]]);
  });

  test("keeps each drafter's q and sampling mode per proposal", () => {
    const qRoot = Float32Array.from([0.5, 0.5]);
    const qNode = Float32Array.from([0.9, 0.1]);
    const sampledTree = draft([0, 1, 1], [-1, -1, 0], { q: [qRoot, qRoot, qNode], sampled: true });
    const ngram = draft([1, 0], [-1, 0]);
    const tree = mergeTrees([sampledTree, ngram]);
    const root = tree.draws[0];
    expect(root.map((d) => [d.drafter, d.sampled, d.q])).toEqual([[0, true, qRoot], [0, true, qRoot], [1, false, null]]);
  });

  test("a ranked drafter repeating a sibling counts once; sampled repeats are refused", () => {
    const tree = mergeTrees([draft([3, 3, 4], [-1, -1, 1])]);
    expect(paths(tree)).toEqual(["3", "3.4"]);
    expect(tree.draws[0]).toHaveLength(1);
    const q = Float32Array.from([0, 0, 0, 0.5, 0.5]);
    expect(() => mergeTrees([draft([3, 3], [-1, -1], { q: [q, q], sampled: true })])).toThrow("repeats token 3");
  });

  test("malformed draft trees are refused with the drafter named", () => {
    expect(() => mergeTrees([draft([1], [-1]), draft([1, 2], [-1, 1])])).toThrow("drafter 1: node 1 has parent 1");
    expect(() => mergeTrees([draft([1, 2], [-1])])).toThrow("2 tokens but 1 parents");
  });

  test("no drafters or empty drafts give an empty tree", () => {
    expect(mergeTrees([]).size).toBe(0);
    expect(mergeTrees([draft([], [])]).draws[0]).toEqual([]);
  });
});

describe("linearize", () => {
  test("root then DFS nodes: positions by depth, ancestor masks, logits for all", () => {
    const tree = mergeTrees([draft([5, 6, 7, 8], [-1, -1, 0, 0])]); // DFS: 5, 5.7, 5.8, 6
    const builder = new BatchBuilder(1);
    builder.addChain(0, 0, [1, 2, 3], 0, "last"); // another sequence in the same batch
    const root = linearize(tree, { seqRow: 3, committed: 10, rootToken: 42, rootPosition: 10 }, builder);
    const batch = builder.build();
    expect(root).toBe(3);
    expect(Array.from(batch.tokens.subarray(3))).toEqual([42, 5, 7, 8, 6]);
    expect(Array.from(batch.positions.subarray(3))).toEqual([10, 11, 12, 12, 11]);
    expect(Array.from(batch.slot.subarray(3))).toEqual([10, 11, 12, 13, 14]);
    expect(Array.from(batch.ancestors.subarray(3))).toEqual([0b1, 0b11, 0b111, 0b1011, 0b10001]);
    expect(Array.from(batch.logitRows)).toEqual([2, 3, 4, 5, 6, 7]);
  });

  test("trees beyond 32 nodes use several mask words", () => {
    // A 40-chain beside 30 leaves under the root: 70 nodes + root.
    const tokens = [...Array.from({ length: 40 }, (_, i) => i), ...Array.from({ length: 30 }, (_, i) => 100 + i)];
    const parents = [...Array.from({ length: 40 }, (_, i) => i - 1), ...new Array(30).fill(-1)];
    const tree = mergeTrees([draft(tokens, parents)]);
    const words = maskWords(tree.size);
    expect(words).toBe(3);
    const builder = new BatchBuilder(words);
    linearize(tree, { seqRow: 0, committed: 0, rootToken: 1, rootPosition: 0 }, builder);
    const batch = builder.build();
    const attends = (i: number) => Array.from({ length: batch.n }, (_, j) => j).filter((j) => (batch.ancestors[i * words + (j >> 5)] >>> (j & 31)) & 1);
    expect(attends(40)).toEqual(Array.from({ length: 41 }, (_, j) => j)); // chain end: root + whole chain
    expect(batch.positions[40]).toBe(40);
    expect(attends(70)).toEqual([0, 70]); // last leaf: root + itself
    expect(() => linearize(tree, { seqRow: 1, committed: 0, rootToken: 1, rootPosition: 0 }, new BatchBuilder(2))).toThrow("more than 64");
  });
});

describe("parseTreeShape", () => {
  test("static widths and dynamic budgets", () => {
    expect(parseTreeShape("1,1,3,1,1,1,1,1")).toEqual({ kind: "static", widths: [1, 1, 3, 1, 1, 1, 1, 1] });
    expect(shapeCapacity(parseTreeShape("1,1,3,1,1,1,1,1"))).toBe(20);
    expect(parseTreeShape(" 2, 2 ")).toEqual({ kind: "static", widths: [2, 2] });
    expect(parseTreeShape("dynamic:32")).toEqual({ kind: "dynamic", budget: 32, maxDepth: 8, width: 4 });
    expect(parseTreeShape("dynamic:60:6:10")).toEqual({ kind: "dynamic", budget: 60, maxDepth: 6, width: 10 });
    expect(shapeCapacity(parseTreeShape("dynamic:60:6:10"))).toBe(60);
  });

  test("errors name the shape and the part at fault", () => {
    expect(() => parseTreeShape("")).toThrow('tree shape "": empty');
    expect(() => parseTreeShape("1,0,2")).toThrow("the width at depth 1 must be a positive integer");
    expect(() => parseTreeShape("1,,2")).toThrow("the width at depth 1");
    expect(() => parseTreeShape("1,x")).toThrow('got "x"');
    expect(() => parseTreeShape("dynamic")).toThrow('expected "dynamic:BUDGET"');
    expect(() => parseTreeShape("dynamic:abc")).toThrow("the node budget must be a positive integer");
    expect(() => parseTreeShape("dynamic:8:0")).toThrow("the maximum depth");
    expect(() => parseTreeShape("dynamics:8")).toThrow('expected "dynamic:BUDGET"');
  });
});

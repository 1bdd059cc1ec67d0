import { expect, test } from "bun:test";
import { BatchBuilder } from "../../src/model/batch";

test("a chain's masks hold every earlier chain token; slots continue the committed prefix", () => {
  const b = new BatchBuilder(2);
  b.addChain(3, 10, [5, 6, 7], 10, "last");
  const batch = b.build();
  expect(Array.from(batch.slot)).toEqual([10, 11, 12]);
  expect(Array.from(batch.positions)).toEqual([10, 11, 12]);
  expect(batch.words).toBe(1);
  expect(Array.from(batch.ancestors)).toEqual([0b1, 0b11, 0b111]);
  expect(Array.from(batch.logitRows)).toEqual([2]);
});

test("tree masks follow parents; rows of different sequences index independently", () => {
  const b = new BatchBuilder(1);
  const root = b.add(0, 4, 9, 4, -1, true);
  const x = b.add(0, 4, 10, 5, root, true);
  b.add(0, 4, 11, 5, root, true);
  b.add(0, 4, 12, 6, x, true);
  b.add(1, 0, 13, 0, -1, false);
  const batch = b.build();
  expect(Array.from(batch.ancestors)).toEqual([0b1, 0b11, 0b101, 0b1011, 0b1]);
  expect(Array.from(batch.slot)).toEqual([4, 5, 6, 7, 0]);
  expect(Array.from(batch.logitRows)).toEqual([0, 1, 2, 3]);
  expect(() => b.add(1, 0, 1, 1, x, false)).toThrow(/another sequence/);
});

test("masks are cut to the words the longest row needs, and explicit node indices set their bits", () => {
  const b = new BatchBuilder(4);
  b.addNode(0, 100, 1, 101, 40, [0, 33], true);
  const batch = b.build();
  expect(batch.words).toBe(2);
  expect(batch.slot[0]).toBe(140);
  expect(Array.from(batch.ancestors)).toEqual([0b1, (1 << 1) | (1 << 8)]);
  expect(() => new BatchBuilder(1).addNode(0, 0, 1, 0, 32, [], false)).toThrow(/more than 32/);
});

import { describe, expect, test } from "bun:test";
import { BlockPool, BlockTables, KVCacheFullError } from "../../src/kv/blocks";

function tables(totalBlocks = 8, blockSize = 4, maxSeqs = 3, maxBlocks = 4) {
  return new BlockTables(new BlockPool(totalBlocks), blockSize, maxSeqs, maxBlocks);
}

describe("BlockPool", () => {
  test("hands out the lowest free ids first and takes them back", () => {
    const pool = new BlockPool(4);
    expect(pool.allocate(2)).toEqual([0, 1]);
    expect(pool.allocate(1)).toEqual([2]);
    pool.release([0, 1]);
    expect(pool.freeBlocks).toBe(3);
    expect(pool.allocate(3)).toEqual([0, 1, 3]);
  });

  test("refuses to over-allocate with a KVCacheFullError and allocates nothing", () => {
    const pool = new BlockPool(2);
    expect(() => pool.allocate(3)).toThrow(KVCacheFullError);
    expect(pool.freeBlocks).toBe(2);
  });

  test("rejects a non-positive size", () => {
    expect(() => new BlockPool(0)).toThrow(/positive integer/);
  });
});

describe("BlockTables", () => {
  test("reserve allocates exactly the blocks the slots need, row-major in the table", () => {
    const t = tables();
    const a = t.openRow();
    const b = t.openRow();
    t.reserve(a, 5); // slots 0..4 -> 2 blocks
    t.reserve(b, 3); // 1 block
    t.reserve(a, 8); // slots 0..7 -> still 2 blocks
    expect(t.blocksOf(a)).toEqual([0, 1]);
    expect(t.blocksOf(b)).toEqual([2]);
    expect(Array.from(t.tables.subarray(0, 4))).toEqual([0, 1, -1, -1]);
    expect(Array.from(t.tables.subarray(4, 8))).toEqual([2, -1, -1, -1]);
    expect(t.pool.freeBlocks).toBe(5);
  });

  test("committing a short path returns the speculative blocks past it", () => {
    const t = tables();
    const a = t.openRow();
    t.reserve(a, 3);
    t.setCommitted(a, 3);
    t.reserve(a, 9); // committed 3 + 9 = 12 slots -> 3 blocks
    expect(t.blocksOf(a)).toEqual([0, 1, 2]);
    t.setCommitted(a, 5); // 2 blocks hold 5 slots
    expect(t.blocksOf(a)).toEqual([0, 1]);
    expect(t.committedLengths[a]).toBe(5);
    expect(t.tables[a * 4 + 2]).toBe(-1);
    expect(t.pool.freeBlocks).toBe(6);
  });

  test("closing every row returns the pool to full", () => {
    const t = tables();
    const rows = [t.openRow(), t.openRow(), t.openRow()];
    rows.forEach((r, i) => t.reserve(r, 3 + 4 * i));
    expect(t.pool.freeBlocks).toBe(8 - (1 + 2 + 3));
    for (const r of rows) t.closeRow(r);
    expect(t.pool.freeBlocks).toBe(8);
    expect(t.activeRows).toBe(0);
    expect(Array.from(t.tables).every((v) => v === -1)).toBe(true);
  });

  test("a closed row is reused, and unknown rows are refused", () => {
    const t = tables();
    const a = t.openRow();
    t.openRow();
    t.closeRow(a);
    expect(t.openRow()).toBe(a);
    expect(() => t.committed(2)).toThrow(/row 2 is not open/);
  });

  test("limits: per-sequence capacity, row count, pool exhaustion, commit past capacity", () => {
    const t = tables(5, 4, 2, 4);
    const a = t.openRow();
    expect(() => t.reserve(a, 17)).toThrow(/limit is 16/);
    t.reserve(a, 16);
    const b = t.openRow();
    expect(() => t.openRow()).toThrow(/all 2 sequence rows/);
    expect(() => t.reserve(b, 8)).toThrow(KVCacheFullError);
    expect(t.blocksOf(b)).toEqual([]);
    expect(() => t.setCommitted(b, 1)).toThrow(/cannot commit 1 slots/);
  });
});

test("advance commits a prefix and keeps the reserved blocks past it", () => {
  const t = tables();
  const a = t.openRow();
  t.reserve(a, 9); // 3 blocks
  t.advance(a, 8);
  expect(t.committed(a)).toBe(8);
  expect(t.blocksOf(a)).toEqual([0, 1, 2]);
  expect(() => t.advance(a, 5)).toThrow(/cannot commit 5 more/);
});

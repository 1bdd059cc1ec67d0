// Shape buckets and batch padding for CUDA graph replay (src/engine/graphs.ts), on the
// CPU backend: padding must not change the real rows' logits nor the KV cache, and the
// capture / replay bookkeeping must return the plain forward's logits (the CPU
// library's graph ops do nothing, so every path runs the real forward).

import { afterAll, beforeAll, expect, test } from "bun:test";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { ROW_BUCKETS, StepGraphs, TOKEN_BUCKETS, bucketIndex, padBatch } from "../../src/engine/graphs";
import { createKVCache } from "../../src/kv/cache";
import { BatchBuilder, type TokenBatch } from "../../src/model/batch";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";

const MODEL = join(import.meta.dir, "..", "..", "models", "llama-shakespeare-8m");

let backend: CpuBackend;
let llm: CausalLM;
beforeAll(() => {
  backend = CpuBackend.create({ threads: 2 });
  llm = loadModel(MODEL, backend, { maxBatchTokens: 64 });
});
afterAll(() => {
  llm?.close();
  backend?.close();
});

test("every token count up to 128 has a bucket that holds it without crossing the matmul switches at 15|16 and 32|33", () => {
  for (let n = 1; n <= 128; n++) {
    const b = TOKEN_BUCKETS[bucketIndex(TOKEN_BUCKETS, n)]!;
    expect(b).toBeGreaterThanOrEqual(n);
    expect(b <= 15).toBe(n <= 15);
    expect(b <= 32).toBe(n <= 32);
  }
  expect(bucketIndex(TOKEN_BUCKETS, 129)).toBe(-1);
  expect(ROW_BUCKETS[bucketIndex(ROW_BUCKETS, 0)]).toBe(0);
});

/** A 5-node tree (root, two children, a grandchild under each) after `committed` slots. */
function tree(row: number, committed: number): TokenBatch {
  const b = new BatchBuilder(llm.maxWords);
  const root = b.add(row, committed, 11, committed, -1, true);
  const a = b.add(row, committed, 12, committed + 1, root, true);
  const c = b.add(row, committed, 13, committed + 1, root, true);
  b.add(row, committed, 14, committed + 2, a, true);
  b.add(row, committed, 15, committed + 2, c, true);
  return b.build();
}

/** Logits of a 10-token prefill, then of a tree on top of it (through `forward`). */
function prefillThenTree(forward: (batch: TokenBatch, kv: ReturnType<typeof createKVCache>) => Float32Array): Float32Array[] {
  const kv = createKVCache(llm, { maxSeqs: 1, maxSeqLen: 64 });
  try {
    const row = kv.openSequence();
    kv.reserve(row, 16);
    const pre = new BatchBuilder(llm.maxWords);
    pre.addChain(row, 0, [1, 2869, 4058, 13, 4076, 4049, 2266, 1984, 4080, 13], 0, "last");
    const first = forward(pre.build(), kv).slice();
    kv.commitPrefix(row, 10);
    return [first, forward(tree(row, 10), kv).slice()];
  } finally {
    kv.close();
  }
}

test("a padded batch gives the unpadded batch's logits for its own rows, and leaves the same KV cache behind", () => {
  const vocab = llm.config.vocabSize;
  const plain = prefillThenTree((b, kv) => llm.forward(b, kv));
  // Pad the prefill to 12 tokens / 4 rows and the tree to 8 tokens / 8 rows.
  const padded = prefillThenTree((b, kv) => {
    const n = b.n === 10 ? 12 : 8;
    const rows = b.n === 10 ? 4 : 8;
    return llm.forward(padBatch(b, n, rows, 1), kv).subarray(0, b.logitRows.length * vocab);
  });
  expect(padded[0]!.length).toBe(vocab);
  expect(padded[1]!.length).toBe(5 * vocab);
  // CPU kernels give a token the same bits whatever else is in the batch.
  expect(Buffer.from(padded[0]!.buffer).equals(Buffer.from(plain[0]!.buffer))).toBe(true);
  expect(Buffer.from(padded[1]!.buffer).equals(Buffer.from(plain[1]!.buffer))).toBe(true);
});

test("padBatch repeats the last token and logit row, widens masks, and refuses to shrink", () => {
  const b = tree(0, 3);
  const p = padBatch(b, 7, 6, 2);
  expect(Array.from(p.tokens)).toEqual([11, 12, 13, 14, 15, 15, 15]);
  expect(Array.from(p.slot)).toEqual([3, 4, 5, 6, 7, 7, 7]);
  expect(Array.from(p.positions)).toEqual([3, 4, 4, 5, 5, 5, 5]);
  expect(Array.from(p.logitRows)).toEqual([0, 1, 2, 3, 4, 4]);
  expect(p.words).toBe(2);
  for (let i = 0; i < 7; i++) {
    expect(p.ancestors[2 * i]).toBe(b.ancestors[Math.min(i, 4)]!);
    expect(p.ancestors[2 * i + 1]).toBe(0);
  }
  expect(() => padBatch(b, 4, 5, 1)).toThrow(/cannot shrink/);
});

test("StepGraphs: warm-up, capture and replay of each bucket return the plain forward's logits", () => {
  const graphs = new StepGraphs(llm, true);
  const plain = prefillThenTree((b, kv) => llm.forward(b, kv));
  for (let round = 0; round < 3; round++) {
    const got = prefillThenTree((b, kv) => graphs.run(b, kv).host());
    expect(got.map((l) => Array.from(l))).toEqual(plain.map((l) => Array.from(l)));
  }
  // Two buckets (10-token prefill, 5-node tree), each: eager once, captured once, replayed once.
  expect(graphs.stats).toEqual({ eager: 2, captured: 2, replayed: 2 });
  const off = new StepGraphs(llm, false);
  prefillThenTree((b, kv) => off.run(b, kv).host());
  expect(off.stats).toEqual({ eager: 2, captured: 0, replayed: 0 });
});

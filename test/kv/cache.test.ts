// KVCache over the CPU backend: its sizes per dtype, block accounting, the plane layout
// the kernels read, and a model forward with an f16 cache against the f32 cache and the
// float64 reference. Random data is fresh each run (SEED=<n> repeats a run).

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType, type KVDType } from "../../src/backend/backend";
import { CpuBackend } from "../../src/backend/cpu";
import { KVCacheFullError } from "../../src/kv/blocks";
import { createKVCache, KVCache, type KVCacheOptions, kvBytesPerToken } from "../../src/kv/cache";
import { BatchBuilder } from "../../src/model/batch";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";
import { SEED, randF32, randInt } from "../helpers/random";
import { referenceForward } from "../helpers/reference-llama";
import { writeTinyModel } from "../helpers/tiny-model";

const backend = CpuBackend.create({ threads: 2 });
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "specinfer-kv-"));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
  backend.close();
});

const SHAPE = { numLayers: 3, numKvHeads: 2, headDim: 24 };
const cache = (opts: Partial<KVCacheOptions> = {}) =>
  new KVCache(backend, { ...SHAPE, maxSeqLen: 64, maxSeqs: 3, blockSize: 4, ...opts });

const h16 = new Float16Array(1);
const f16Bits = (x: number) => ((h16[0] = x), new Uint16Array(h16.buffer)[0]);

describe("sizes", () => {
  test("bytes per token = K and V of every layer: 2 * layers * kvHeads * headDim * (2 for F16, 4 for F32); F16 is the default", () => {
    const perToken = (bytes: number) => 2 * SHAPE.numLayers * SHAPE.numKvHeads * SHAPE.headDim * bytes;
    expect(kvBytesPerToken(SHAPE, DType.F16)).toBe(perToken(2));
    expect(kvBytesPerToken(SHAPE, DType.F32)).toBe(perToken(4));
    expect(kvBytesPerToken(SHAPE)).toBe(perToken(2));
    const kv = cache({ numBlocks: 10 });
    expect(kv.dtype).toBe(DType.F16);
    expect(kv.bytesPerToken).toBe(perToken(2));
    expect(kv.bytes).toBe(10 * 4 * perToken(2));
    kv.close();
    const kv32 = cache({ numBlocks: 10, dtype: DType.F32 });
    expect(kv32.bytesPerToken).toBe(perToken(4));
    expect(kv32.bytes).toBe(10 * 4 * perToken(4));
    kv32.close();
  });

  test("a memory budget buys floor(budget / (blockSize * bytesPerToken)) blocks: twice as many in F16 as in F32", () => {
    const block16 = 4 * kvBytesPerToken(SHAPE, DType.F16);
    const budget = 37 * block16 + block16 - 1;
    const kv16 = cache({ memoryBytes: budget, dtype: DType.F16 });
    const kv32 = cache({ memoryBytes: budget, dtype: DType.F32 });
    expect(kv16.totalBlocks).toBe(37);
    expect(kv32.totalBlocks).toBe(18);
    expect(kv16.bytes).toBeLessThanOrEqual(budget);
    expect(kv32.bytes).toBeLessThanOrEqual(budget);
    kv16.close();
    kv32.close();
    expect(() => cache({ memoryBytes: block16 - 1 })).toThrow(/holds no \d+-byte block/);
  });

  test("a dtype other than F32/F16 is refused with its name", () => {
    expect(() => cache({ dtype: DType.Q8_0 as KVDType })).toThrow(/KV cache: dtype Q8_0 is not supported, use F32 or F16/);
    expect(() => kvBytesPerToken(SHAPE, DType.BF16 as KVDType)).toThrow(/dtype BF16 is not supported/);
    expect(() => kvBytesPerToken(SHAPE, 5 as KVDType)).toThrow(/dtype 5 is not supported/);
  });
});

describe("block accounting", () => {
  test("blocksToReserve(row, extra) is what reserve(row, extra) then takes, and takes nothing itself; usedBlocks = total - free", () => {
    const kv = cache({ numBlocks: 24 });
    const rows = [kv.openSequence(), kv.openSequence(), kv.openSequence()];
    for (let step = 0; step < 300; step++) {
      const row = rows[randInt(rows.length)];
      const room = kv.tables.maxSlots - kv.committed(row);
      const extra = randInt(room + 1);
      const predicted = kv.blocksToReserve(row, extra);
      const free = kv.freeBlocks;
      expect(kv.blocksToReserve(row, extra)).toBe(predicted);
      expect(kv.freeBlocks).toBe(free);
      if (predicted > free) {
        expect(() => kv.reserve(row, extra)).toThrow(KVCacheFullError);
        expect(kv.freeBlocks).toBe(free);
      } else {
        kv.reserve(row, extra);
        expect(free - kv.freeBlocks).toBe(predicted);
        expect(kv.capacity(row)).toBeGreaterThanOrEqual(kv.committed(row) + extra);
        expect(kv.blocksToReserve(row, extra)).toBe(0);
      }
      expect(kv.usedBlocks).toBe(kv.totalBlocks - kv.freeBlocks);
      // Now and then commit a few of the reserved slots, or close and reopen the row.
      const r = randInt(10);
      if (r < 3) kv.commitPrefix(row, randInt(kv.capacity(row) - kv.committed(row) + 1));
      else if (r === 3) {
        kv.closeSequence(row);
        rows[rows.indexOf(row)] = kv.openSequence();
      }
    }
    for (const row of rows) kv.closeSequence(row);
    expect(kv.usedBlocks).toBe(0);
    kv.close();
  });

  test("blocksToReserve refuses what reserve refuses: past the sequence limit, a negative or fractional count", () => {
    const kv = cache({ numBlocks: 8 });
    const row = kv.openSequence();
    expect(() => kv.blocksToReserve(row, 65)).toThrow(/needs 65 slots, the limit is 64/);
    expect(() => kv.blocksToReserve(row, -1)).toThrow(/non-negative integer, got -1/);
    expect(() => kv.blocksToReserve(row, 1.5)).toThrow(/non-negative integer, got 1.5/);
    expect(() => kv.blocksToReserve(2, 1)).toThrow(/row 2 is not open/);
    expect(kv.blocksToReserve(row, 64)).toBe(16); // more than the pool: a count, not an error
    kv.close();
  });
});

describe("plane layout", () => {
  for (const dtype of [DType.F32, DType.F16] as KVDType[]) {
    test(`${DType[dtype]}: every layer's K and V plane holds its own rows, and commit moves them in every plane`, () => {
      const kv = cache({ numBlocks: 20, dtype });
      const elem = dtype === DType.F16 ? 2 : 4;
      const rowLen = SHAPE.numKvHeads * SHAPE.headDim;
      const row = kv.openSequence();
      const n = 10;
      kv.reserve(row, n);
      kv.syncIndex();
      const dev = (a: ArrayBufferView) => {
        const b = backend.alloc(a.byteLength);
        backend.upload(b.ptr, a);
        return b;
      };
      const seq = dev(new Int32Array(n).fill(row));
      const slot = dev(Int32Array.from({ length: n }, (_, i) => i));
      const written: Float32Array[] = [];
      for (let l = 0; l < SHAPE.numLayers; l++) {
        const k = randF32(n * rowLen);
        const v = randF32(n * rowLen);
        written.push(k, v);
        const [kb, vb] = [dev(k), dev(v)];
        backend.kvWrite(kb.ptr, vb.ptr, n, rowLen, seq.ptr, slot.ptr, kv.blockTablesPtr, kv.maxBlocksPerSeq, kv.blockSize, kv.kPlane(l), kv.vPlane(l), dtype);
        backend.free(kb);
        backend.free(vb);
      }
      backend.free(seq);
      backend.free(slot);

      /** The stored bits of slot `s` in plane p (2l = K of layer l, 2l + 1 = V). */
      const stored = (p: number, s: number): number[] => {
        const plane = p % 2 === 0 ? kv.kPlane(p / 2) : kv.vPlane((p - 1) / 2);
        const blocks = kv.tables.blocksOf(row);
        const off = (blocks[Math.floor(s / kv.blockSize)] * kv.blockSize + (s % kv.blockSize)) * rowLen * elem;
        const out = dtype === DType.F16 ? new Uint16Array(rowLen) : new Uint32Array(rowLen);
        backend.download(out, plane + off);
        return Array.from(out);
      };
      const bitsOf = (p: number, i: number): number[] => {
        const x = written[p].subarray(i * rowLen, (i + 1) * rowLen);
        return dtype === DType.F16 ? Array.from(x, f16Bits) : Array.from(new Uint32Array(x.slice().buffer));
      };
      for (let p = 0; p < 2 * SHAPE.numLayers; p++) for (let i = 0; i < n; i++) expect(stored(p, i)).toEqual(bitsOf(p, i));

      // Keep slots 0, 2, 3, 7 (a tree path): 2 -> 1, 3 -> 2, 7 -> 3 in every plane.
      const kept = [0, 2, 3, 7];
      kv.commit(row, kept);
      expect(kv.committed(row)).toBe(4);
      for (let p = 0; p < 2 * SHAPE.numLayers; p++) kept.forEach((from, to) => expect(stored(p, to)).toEqual(bitsOf(p, from)));
      kv.close();
    });
  }
});

// ---- a model forward over an f16 cache --------------------------------------------------------

/** One prefill of two sequences in one batch, a token tree on the first with a commit
 *  that moves K/V, then a decode step of both: every forward's logits, concatenated. */
function scenario(model: CausalLM, dtype: KVDType, prompts: number[][], tree: { token: number; parent: number }[], kept: number[], next: number[]): Float32Array[] {
  const kv = createKVCache(model, { maxSeqs: 2, maxSeqLen: 64, dtype });
  const out: Float32Array[] = [];
  const rows = prompts.map(() => kv.openSequence());
  const pre = new BatchBuilder(model.maxWords);
  prompts.forEach((p, s) => {
    kv.reserve(rows[s], p.length);
    pre.addChain(rows[s], 0, p, 0, "all");
  });
  out.push(model.forward(pre.build(), kv).slice());
  prompts.forEach((p, s) => kv.commitPrefix(rows[s], p.length));

  const base = prompts[0].length;
  kv.reserve(rows[0], tree.length);
  const tb = new BatchBuilder(model.maxWords);
  const depth: number[] = [];
  tree.forEach((node, i) => {
    depth[i] = node.parent < 0 ? 0 : depth[node.parent] + 1;
    tb.add(rows[0], base, node.token, base + depth[i], node.parent, true);
  });
  out.push(model.forward(tb.build(), kv).slice());
  kv.commit(rows[0], kept.map((j) => base + j));

  const dec = new BatchBuilder(model.maxWords);
  next.forEach((token, s) => {
    const c = kv.committed(rows[s]);
    kv.reserve(rows[s], 1);
    dec.addChain(rows[s], c, [token], c, "all");
  });
  out.push(model.forward(dec.build(), kv).slice());
  kv.close();
  return out;
}

/** max |got - want| over max |want|, over all rows. */
function relError(got: ArrayLike<number>[], want: ArrayLike<number>[]): number {
  let diff = 0;
  let scale = 0;
  want.forEach((w, r) => {
    for (let i = 0; i < w.length; i++) {
      diff = Math.max(diff, Math.abs(got[r][i] - w[i]));
      scale = Math.max(scale, Math.abs(w[i]));
    }
  });
  return diff / scale;
}

describe("model forward with an f16 cache", () => {
  // K and V are stored with a relative error of at most u = 2^-11 (f16 rounding); the
  // logits of a 2-layer model move by a small multiple of it (measured: at most 1.7u over
  // 40 seeds). 4u leaves room for the seed and fails for anything coarser than f16
  // rounding (bf16's 2^-8 = 16u, or a wrong row read).
  const u = 2 ** -11;
  const tol = 4 * u;

  test(`prefill of 2 sequences, a tree with a moving commit, a decode: logits within ${tol.toExponential(2)} (4u) of the f32 cache's and of float64`, () => {
    const seed = SEED % 1000;
    const m = writeTinyModel(join(dir, `tiny-${seed}`), {
      seed,
      dims: { vocab: 96, hidden: 64, intermediate: 96, layers: 2, heads: 4, kvHeads: 2 },
      dtype: "F32",
      format: "safetensors",
    });
    const model = loadModel(m.path, backend, { maxBatchTokens: 64 });
    const prompts = [
      Array.from({ length: 14 }, () => randInt(96)),
      Array.from({ length: 7 }, () => randInt(96)),
    ];
    // a(0) -> b(1) -> c(2); a -> d(3); e(4). Keeping a, d moves d's K/V down two slots.
    const tree = [40, 41, 42, 43, 44].map((token, i) => ({ token, parent: [-1, 0, 1, 0, -1][i] }));
    const kept = [0, 3];
    const next = [randInt(96), randInt(96)];

    const f32 = scenario(model, DType.F32, prompts, tree, kept, next);
    const f16 = scenario(model, DType.F16, prompts, tree, kept, next);
    const err = relError(f16, f32);
    expect(err).toBeGreaterThan(0); // the f16 planes are really in use
    expect(err).toBeLessThanOrEqual(tol);

    // The last decode against float64 over the committed sequences: the moved K/V is
    // the accepted path's.
    const V = m.config.vocabSize;
    const seqs = [[...prompts[0], 40, 43, next[0]], [...prompts[1], next[1]]];
    const want = seqs.map((s) => referenceForward(m.config, m.weights, s).at(-1)!);
    const decode = f16[2];
    expect(relError([decode.subarray(0, V), decode.subarray(V, 2 * V)], want)).toBeLessThanOrEqual(tol);
    const decode32 = f32[2];
    expect(relError([decode32.subarray(0, V), decode32.subarray(V, 2 * V)], want)).toBeLessThanOrEqual(1e-4);
    model.close();
  });

  test("the vendored 8M model and its 1.4M draft reproduce PyTorch's 32-token greedy continuations of all 12 reference prompts", () => {
    const root = join(import.meta.dir, "..", "..", "models");
    const reference = JSON.parse(readFileSync(join(root, "reference-greedy.json"), "utf8")) as {
      input_ids: number[];
      target_greedy: number[];
      draft_greedy: number[];
    }[];
    for (const [name, key] of [["llama-shakespeare-8m", "target_greedy"], ["llama-shakespeare-1.4m-draft", "draft_greedy"]] as const) {
      const model = loadModel(join(root, name), backend, { maxBatchTokens: 128 });
      for (const r of reference) {
        const kv = createKVCache(model, { maxSeqs: 1, maxSeqLen: 128, dtype: DType.F16 });
        const row = kv.openSequence();
        const generated: number[] = [];
        let feed = r.input_ids;
        while (generated.length < 32) {
          const c = kv.committed(row);
          kv.reserve(row, feed.length);
          const b = new BatchBuilder(model.maxWords);
          b.addChain(row, c, feed, c, "last");
          const logits = model.forward(b.build(), kv);
          kv.commitPrefix(row, feed.length);
          let best = 0;
          for (let v = 1; v < logits.length; v++) if (logits[v] > logits[best]) best = v;
          generated.push(best);
          feed = [best];
        }
        kv.close();
        expect(generated).toEqual(r[key]);
      }
      model.close();
    }
  });
});

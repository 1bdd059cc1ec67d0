// CUDA backend against the CPU backend, op by op, on random data of realistic shapes.
// Runs only with SPECINFER_GPU=1 on a machine with a GPU and zig-out/lib/libspecinfer_cuda.so
// (`npm run build` where nvcc exists); elsewhere every test is reported as skipped, with
// the reason in its name. Each run draws a new seed; failures print it (SEED=<n> repeats).
//
//   SPECINFER_GPU=1 node_modules/.bin/bun test test/backend/cuda.test.ts --timeout 300000

import { afterAll, beforeAll, describe, expect } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Activation, type Backend, BackendError, DType, DTYPE_NAMES, type KVDType, type Ptr, RopeLayout } from "../../src/backend/backend.ts";
import { CpuBackend } from "../../src/backend/cpu.ts";
import { CudaBackend } from "../../src/backend/cuda.ts";
import { SEED, randInt, randF32, shuffle } from "../helpers/random.ts";
import { GPU, gpuTest } from "../helpers/gpu.ts";


let cpu: CpuBackend;
let gpu: CudaBackend;
beforeAll(() => {
  if (!GPU) return;
  cpu = CpuBackend.create({ threads: 2 });
  gpu = CudaBackend.create();
});
afterAll(() => {
  cpu?.close();
  gpu?.close();
});

/** The same bytes on both backends ([cpu, gpu]); `pad` leading bytes make unaligned views. */
function put(data: ArrayBufferView, pad = 0): [Ptr, Ptr] {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return [cpu, gpu].map((be: Backend) => {
    const b = be.alloc(bytes.byteLength + pad + 64);
    be.upload(b.ptr + pad, bytes);
    return b.ptr + pad;
  }) as [Ptr, Ptr];
}
function zeros(bytes: number): [Ptr, Ptr] {
  return [cpu.alloc(bytes).ptr, gpu.alloc(bytes).ptr];
}
function f32(be: Backend, p: Ptr, count: number): Float32Array {
  const a = new Float32Array(count);
  be.download(a, p);
  return a;
}
function bytes(be: Backend, p: Ptr, count: number): Uint8Array {
  const a = new Uint8Array(count);
  be.download(a, p);
  return a;
}
function i32(be: Backend, p: Ptr, count: number): Int32Array {
  const a = new Int32Array(count);
  be.download(a, p);
  return a;
}

/** |gpu - cpu| <= rtol * (|cpu| + 0.1 * max|cpu|): relative, with a floor for values near 0. */
function expectClose(label: string, got: Float32Array, want: Float32Array, rtol: number): void {
  expect(got.length).toBe(want.length);
  let maxAbs = 0;
  for (let i = 0; i < want.length; i++) maxAbs = Math.max(maxAbs, Math.abs(want[i]));
  for (let i = 0; i < want.length; i++) {
    const tol = rtol * (Math.abs(want[i]) + 0.1 * maxAbs);
    const d = Math.abs(got[i] - want[i]);
    if (!(d <= tol)) {
      throw new Error(`${label}: index ${i}: gpu ${got[i]}, cpu ${want[i]} (|diff| ${d} > ${tol}); SEED=${SEED}`);
    }
  }
}
function expectSame(label: string, got: ArrayLike<number>, want: ArrayLike<number>): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    if (!Object.is(got[i], want[i])) throw new Error(`${label}: index ${i}: gpu ${got[i]}, cpu ${want[i]}; SEED=${SEED}`);
  }
}

// ---- random weights in the GGML layouts ----------------------------------------------------

/** A normal f16 with |x| in [2^(lo-15), 2^(hi-14)): built from bits, no rounding needed. */
function randF16Bits(lo = 10, hi = 16): number {
  const e = lo + randInt(hi - lo + 1);
  return (randInt(2) << 15) | (e << 10) | randInt(1024);
}
function randWeights(dtype: DType, rows: number, k: number): Uint8Array {
  const count = rows * k;
  switch (dtype) {
    case DType.F32:
      return new Uint8Array(randF32(count).buffer);
    case DType.F16: {
      const u = new Uint16Array(count);
      for (let i = 0; i < count; i++) u[i] = randF16Bits();
      return new Uint8Array(u.buffer);
    }
    case DType.BF16: {
      const u = new Uint16Array(count);
      const f = randF32(count);
      const bits = new Uint32Array(f.buffer);
      for (let i = 0; i < count; i++) u[i] = bits[i] >>> 16;
      return new Uint8Array(u.buffer);
    }
    case DType.Q8_0:
    case DType.Q4_0: {
      const bs = dtype === DType.Q8_0 ? 34 : 18;
      const out = new Uint8Array((count / 32) * bs);
      const dv = new DataView(out.buffer);
      for (let b = 0; b < count / 32; b++) {
        dv.setUint16(b * bs, randF16Bits(8, 12), true); // scales 2^-7 .. 2^-2
        for (let j = 2; j < bs; j++) out[b * bs + j] = randInt(256);
      }
      return out;
    }
  }
}

const DTYPES = [DType.F32, DType.F16, DType.BF16, DType.Q8_0, DType.Q4_0];
const isQuant = (d: DType) => d === DType.Q8_0 || d === DType.Q4_0;
const tolOf = (d: DType) => (isQuant(d) ? 1e-2 : 1e-4);

// ---- memory ----------------------------------------------------------------------------

gpuTest("alloc is zeroed; upload/download round-trip; weights() uploads once", () => {
  const b = gpu.alloc(4096);
  expect(b.host).toBeNull();
  const z = new Uint8Array(4096);
  z.fill(7);
  gpu.download(z, b.ptr);
  expect(z.every((v) => v === 0)).toBe(true);
  const data = randF32(1024);
  gpu.upload(b.ptr, data);
  expectSame("round-trip", f32(gpu, b.ptr, 1024), data);

  const dir = mkdtempSync(join(tmpdir(), "si-cuda-"));
  try {
    const bytes = new Uint8Array(10_000);
    for (let i = 0; i < bytes.length; i++) bytes[i] = randInt(256);
    const path = join(dir, "w.bin");
    writeFileSync(path, bytes);
    const file = gpu.mapFile(path);
    expect(file.size).toBe(bytes.length);
    const p = gpu.weights(file, 100, 4000);
    expect(gpu.weights(file, 100, 4000)).toBe(p);
    file.close();
    const back = new Uint8Array(4000);
    gpu.download(back, p); // a copy: still valid after the mapping is gone
    expectSame("weights", back, bytes.subarray(100, 4100));
    expect(() => gpu.weights(file, 9000, 2000)).toThrow(BackendError);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---- embedding and matmul --------------------------------------------------------------------

describe("embedding", () => {
  for (const dtype of DTYPES) {
    gpuTest(`${DTYPE_NAMES[dtype]}: rows as f32, bit-exact`, () => {
      const vocab = 300;
      const dim = 768;
      const [tc, tg] = put(randWeights(dtype, vocab, dim));
      const ids = Int32Array.from({ length: 37 }, () => randInt(vocab));
      ids[0] = vocab - 1;
      const [ic, ig] = put(ids);
      const [oc, og] = zeros(ids.length * dim * 4);
      cpu.embedding(tc, dtype, vocab, dim, ic, ids.length, oc);
      gpu.embedding(tg, dtype, vocab, dim, ig, ids.length, og);
      expectSame("embedding", f32(gpu, og, ids.length * dim), f32(cpu, oc, ids.length * dim));
    });
  }
});

describe("matmul", () => {
  for (const dtype of DTYPES) {
    // k = 768, m = 2304: GEMV passes (n <= 32: 8/4/2/1 token groups, 1 or 4 rows per
    // warp) and the tiled path (n > 32), with and without bias.
    gpuTest(`${DTYPE_NAMES[dtype]}: k=768 m=2304, n = 1..80, bias`, () => {
      const k = 768;
      const m = 2304;
      const [wc, wg] = put(randWeights(dtype, m, k));
      const [bc, bg] = put(randF32(m));
      for (const n of [1, 2, 3, 7, 8, 13, 32, 33, 80]) {
        const [xc, xg] = put(randF32(n * k));
        const [yc, yg] = zeros(n * m * 4);
        const withBias = n % 2 === 1;
        cpu.matmul(xc, n, k, wc, dtype, m, withBias ? bc : 0, yc);
        gpu.matmul(xg, n, k, wg, dtype, m, withBias ? bg : 0, yg);
        expectClose(`n=${n}`, f32(gpu, yg, n * m), f32(cpu, yc, n * m), tolOf(dtype));
      }
    });
  }

  for (const dtype of [DType.F32, DType.F16, DType.BF16]) {
    gpuTest(`${DTYPE_NAMES[dtype]}: k not a multiple of 8, unaligned x (scalar GEMV, tile edges)`, () => {
      for (const [n, k, m] of [[1, 100, 37], [5, 100, 37], [70, 100, 37], [3, 771, 65], [4, 768, 130]]) {
        const [wc, wg] = put(randWeights(dtype, m, k));
        const [xc, xg] = put(randF32(n * k), 4); // 4 bytes off 16-byte alignment
        const [yc, yg] = zeros(n * m * 4);
        cpu.matmul(xc, n, k, wc, dtype, m, 0, yc);
        gpu.matmul(xg, n, k, wg, dtype, m, 0, yg);
        expectClose(`n=${n} k=${k} m=${m}`, f32(gpu, yg, n * m), f32(cpu, yc, n * m), tolOf(dtype));
      }
    });
  }

  gpuTest("quantized: odd block counts and row counts (k=32, 96; m=1, 7, 67)", () => {
    for (const dtype of [DType.Q8_0, DType.Q4_0]) {
      for (const [n, k, m] of [[1, 32, 1], [4, 96, 7], [33, 96, 67], [9, 544, 67]]) {
        const [wc, wg] = put(randWeights(dtype, m, k));
        const [xc, xg] = put(randF32(n * k));
        const [yc, yg] = zeros(n * m * 4);
        cpu.matmul(xc, n, k, wc, dtype, m, 0, yc);
        gpu.matmul(xg, n, k, wg, dtype, m, 0, yg);
        expectClose(`${DTYPE_NAMES[dtype]} n=${n} k=${k} m=${m}`, f32(gpu, yg, n * m), f32(cpu, yc, n * m), 1e-2);
      }
    }
  });

  gpuTest("a token's row does not depend on the rest of the batch (n <= 32)", () => {
    const k = 768;
    const m = 2304;
    for (const dtype of DTYPES) {
      const [, wg] = put(randWeights(dtype, m, k));
      const x = randF32(13 * k);
      const [, xg] = put(x);
      const [, yg] = zeros(13 * m * 4);
      gpu.matmul(xg, 13, k, wg, dtype, m, 0, yg);
      const all = f32(gpu, yg, 13 * m);
      const [, x1] = put(x.subarray(6 * k, 7 * k));
      const [, y1] = zeros(m * 4);
      gpu.matmul(x1, 1, k, wg, dtype, m, 0, y1);
      expectSame(`${DTYPE_NAMES[dtype]} row 6`, f32(gpu, y1, m), all.subarray(6 * m, 7 * m));
    }
  });
});

// ---- per-row and elementwise ops --------------------------------------------------------------

gpuTest("rmsnorm (dim 768, 2048, 5000; in place)", () => {
  for (const dim of [768, 2048, 5000]) {
    const n = 7;
    const [xc, xg] = put(randF32(n * dim, 3));
    const [wc, wg] = put(randF32(dim));
    const [yc, yg] = zeros(n * dim * 4);
    cpu.rmsnorm(xc, wc, n, dim, 1e-5, yc);
    gpu.rmsnorm(xg, wg, n, dim, 1e-5, yg);
    expectClose(`dim=${dim}`, f32(gpu, yg, n * dim), f32(cpu, yc, n * dim), 1e-4);
    cpu.rmsnorm(xc, wc, n, dim, 1e-5, xc);
    gpu.rmsnorm(xg, wg, n, dim, 1e-5, xg);
    expectClose(`dim=${dim} in place`, f32(gpu, xg, n * dim), f32(cpu, xc, n * dim), 1e-4);
  }
});

describe("rope", () => {
  for (const layout of [RopeLayout.Half, RopeLayout.Interleaved]) {
    for (const [headDim, rotDim] of [[64, 64], [128, 128], [64, 32], [80, 80]]) {
      gpuTest(`${layout === RopeLayout.Half ? "rotate-half" : "interleaved"} head_dim=${headDim} rot_dim=${rotDim}`, () => {
        const n = 9;
        const nHeads = 12;
        const pos = Int32Array.from({ length: n }, () => randInt(5000));
        const inv = Float32Array.from({ length: rotDim / 2 }, (_, j) => 1 / 10000 ** ((2 * j) / rotDim));
        const x = randF32(n * nHeads * headDim);
        const [xc, xg] = put(x);
        const [pc, pg] = put(pos);
        const [fc, fg] = put(inv);
        cpu.rope(xc, n, nHeads, headDim, rotDim, pc, fc, layout);
        gpu.rope(xg, n, nHeads, headDim, rotDim, pg, fg, layout);
        expectClose("rope", f32(gpu, xg, x.length), f32(cpu, xc, x.length), 1e-4);
      });
    }
  }
});

gpuTest("swiglu (also in place) and add", () => {
  const count = 2304 * 5 + 3;
  const [gc, gg] = put(randF32(count, 6));
  const [uc, ug] = put(randF32(count, 2));
  const [oc, og] = zeros(count * 4);
  cpu.swiglu(gc, uc, count, oc);
  gpu.swiglu(gg, ug, count, og);
  expectClose("swiglu", f32(gpu, og, count), f32(cpu, oc, count), 1e-4);
  cpu.swiglu(gc, uc, count, gc);
  gpu.swiglu(gg, ug, count, gg);
  expectClose("swiglu in place", f32(gpu, gg, count), f32(cpu, gc, count), 1e-4);
  cpu.add(oc, uc, count);
  gpu.add(og, ug, count);
  expectClose("add", f32(gpu, og, count), f32(cpu, oc, count), 1e-6);
});

gpuTest("argmax (ties -> lowest index) and softmax over a 32000 vocabulary", () => {
  const rows = 5;
  const n = 32000;
  const x = randF32(rows * n, 8);
  for (let r = 0; r < rows; r++) {
    const a = randInt(n);
    const b = randInt(n);
    x[r * n + a] = 20;
    x[r * n + b] = 20; // a tie
  }
  const [xc, xg] = put(x);
  const [ac, ag] = zeros(rows * 4);
  cpu.argmax(xc, rows, n, ac);
  gpu.argmax(xg, rows, n, ag);
  expectSame("argmax", i32(gpu, ag, rows), i32(cpu, ac, rows));
  cpu.softmax(xc, rows, n, 0.7);
  gpu.softmax(xg, rows, n, 0.7);
  expectClose("softmax", f32(gpu, xg, rows * n), f32(cpu, xc, rows * n), 1e-4);
});

// ---- paged KV cache, tree attention, commit moves --------------------------------------------

interface AttnCase {
  kvDtype: KVDType;
  headDim: number;
  nHeads: number;
  nKv: number;
  seqs: { committed: number; parents: number[] }[];
  /** Pass per-head ALiBi slopes. */
  alibi?: boolean;
}

/** Random tree of `len` nodes in DFS-like order: each node's parent is an earlier node. */
const tree = (len: number) => Array.from({ length: len }, (_, j) => (j === 0 ? -1 : randInt(j + 1) - 1));
const chain = (len: number) => Array.from({ length: len }, (_, j) => j - 1);

/** `count` random cache elements of `kvDtype` (f16: uniform values rounded to f16). */
function planeData(kvDtype: KVDType, count: number): Float32Array | Uint16Array {
  return kvDtype === DType.F16 ? new Uint16Array(Float16Array.from(randF32(count)).buffer) : randF32(count);
}
const kvBytes = (kvDtype: KVDType, count: number) => count * (kvDtype === DType.F16 ? 2 : 4);

function runAttention(c: AttnCase): void {
  const { kvDtype, headDim, nHeads, nKv, seqs } = c;
  const row = nKv * headDim;
  const blockSize = 16;
  const maxBlocks = Math.max(...seqs.map((s) => Math.ceil((s.committed + s.parents.length) / blockSize))) + 2;
  const poolBlocks = seqs.length * maxBlocks + 5;
  const words = Math.max(...seqs.map((s) => Math.ceil(s.parents.length / 32)));
  // Every row gets non-contiguous blocks from a shuffled pool; unused entries are -1.
  const perm = shuffle(Array.from({ length: poolBlocks }, (_, i) => i));
  const tables = new Int32Array(seqs.length * maxBlocks).fill(-1);
  let next = 0;
  seqs.forEach((s, si) => {
    const need = Math.ceil((s.committed + s.parents.length) / blockSize);
    for (let b = 0; b < need; b++) tables[si * maxBlocks + b] = perm[next++];
  });
  // Batch rows of all sequences, interleaved.
  const order: [number, number][] = [];
  seqs.forEach((s, si) => s.parents.forEach((_, j) => order.push([si, j])));
  shuffle(order);
  const n = order.length;
  const seq = Int32Array.from(order, ([s]) => s);
  const slot = Int32Array.from(order, ([s, j]) => seqs[s].committed + j);
  const anc = new Uint32Array(n * words);
  order.forEach(([s, j], i) => {
    for (let a = j; a >= 0; a = seqs[s].parents[a]) anc[i * words + (a >> 5)] |= 1 << (a & 31);
  });
  const committed = Int32Array.from(seqs, (s) => s.committed);
  const planeFloats = poolBlocks * blockSize * row;

  const planeBytes = kvBytes(kvDtype, planeFloats);
  const [kc, kg] = put(planeData(kvDtype, planeFloats));
  const [vc, vg] = put(planeData(kvDtype, planeFloats));
  const [knc, kng] = put(randF32(n * row));
  const [vnc, vng] = put(randF32(n * row));
  const [sc, sg] = put(seq);
  const [slc, slg] = put(slot);
  const [tc, tg] = put(tables);
  cpu.kvWrite(knc, vnc, n, row, sc, slc, tc, maxBlocks, blockSize, kc, vc, kvDtype);
  gpu.kvWrite(kng, vng, n, row, sg, slg, tg, maxBlocks, blockSize, kg, vg, kvDtype);
  // Both round to f16 to nearest even: the planes agree bit for bit.
  expectSame("K plane after kvWrite", bytes(gpu, kg, planeBytes), bytes(cpu, kc, planeBytes));
  expectSame("V plane after kvWrite", bytes(gpu, vg, planeBytes), bytes(cpu, vc, planeBytes));

  const [qc, qg] = put(randF32(n * nHeads * headDim, 2));
  const [cc, cg] = put(committed);
  const [ac, ag] = put(anc);
  const [oc, og] = zeros(n * nHeads * headDim * 4);
  const scale = 1 / Math.sqrt(headDim);
  const [lc, lg] = c.alibi ? put(Float32Array.from({ length: nHeads }, (_, h) => 2 ** (-(8 * (h + 1)) / nHeads))) : [0, 0];
  cpu.attention(qc, n, nHeads, nKv, headDim, kc, vc, kvDtype, tc, maxBlocks, blockSize, sc, cc, ac, words, scale, oc, lc);
  gpu.attention(qg, n, nHeads, nKv, headDim, kg, vg, kvDtype, tg, maxBlocks, blockSize, sg, cg, ag, words, scale, og, lg);
  const size = n * nHeads * headDim;
  expectClose("attention", f32(gpu, og, size), f32(cpu, oc, size), 1e-4);
}

describe("layernorm, activation, addRows", () => {
  for (const withBias of [true, false]) {
    gpuTest(`layernorm ${withBias ? "with" : "without"} bias == CPU, in place too`, () => {
      for (const [n, dim] of [[1, 64], [7, 77], [33, 4096]]) {
        const [xc, xg] = put(Float32Array.from(randF32(n * dim, 3), (v) => v + 20));
        const [wc, wg] = put(randF32(dim));
        const [bc, bg] = withBias ? put(randF32(dim)) : [0, 0];
        const [yc, yg] = zeros(n * dim * 4);
        cpu.layernorm(xc, wc, bc, n, dim, 1e-5, yc);
        gpu.layernorm(xg, wg, bg, n, dim, 1e-5, yg);
        expectClose(`layernorm n=${n} dim=${dim}`, f32(gpu, yg, n * dim), f32(cpu, yc, n * dim), 1e-4);
        gpu.layernorm(xg, wg, bg, n, dim, 1e-5, xg);
        expectSame("layernorm in place", f32(gpu, xg, n * dim), f32(gpu, yg, n * dim));
      }
    });
  }
  for (const [kind, name] of [[Activation.ReLU, "ReLU"], [Activation.GELU, "GELU"], [Activation.GELUTanh, "GELU (tanh)"]] as const) {
    gpuTest(`${name} == CPU`, () => {
      const count = 100_003;
      const x = randF32(count, 8);
      x[0] = -30;
      x[1] = 30;
      const [xc, xg] = put(x);
      const [oc, og] = zeros(count * 4);
      cpu.activation(xc, count, kind, oc);
      gpu.activation(xg, count, kind, og);
      expectClose(name, f32(gpu, og, count), f32(cpu, oc, count), 1e-5);
    });
  }
  gpuTest("clamp == CPU, bit-exact", () => {
    const count = 100_003;
    const [xc, xg] = put(randF32(count, 8));
    cpu.clamp(xc, count, 2.5);
    gpu.clamp(xg, count, 2.5);
    expectSame("clamp", f32(gpu, xg, count), f32(cpu, xc, count));
  });
  for (const dtype of DTYPES) {
    gpuTest(`addRows ${DTYPE_NAMES[dtype]}: x += table[ids + offset], bit-exact`, () => {
      const rows = 50;
      const dim = 768;
      const [tc, tg] = put(randWeights(dtype, rows, dim));
      const ids = Int32Array.from({ length: 37 }, () => randInt(rows - 2));
      ids[0] = -2;
      const [ic, ig] = put(ids);
      const x = randF32(ids.length * dim);
      const [xc, xg] = put(x);
      cpu.addRows(xc, tc, dtype, rows, dim, ic, ids.length, 2);
      gpu.addRows(xg, tg, dtype, rows, dim, ig, ids.length, 2);
      expectSame("addRows", f32(gpu, xg, ids.length * dim), f32(cpu, xc, ids.length * dim));
    });
  }
  gpuTest("addRows: an id outside the table is reported by the next sync", () => {
    const [, tg] = put(new Float32Array(4 * 32));
    const [, xg] = put(new Float32Array(2 * 32));
    const [, ig] = put(Int32Array.from([0, 2]));
    gpu.addRows(xg, tg, DType.F32, 4, 32, ig, 2, 2);
    expect(() => gpu.sync()).toThrow(/si_add_rows: id 2 \+ offset 2 at index 1 is outside \[0, 4\)/);
  });
});

describe("kvWrite + attention", () => {
  // A 40-node tree (W = 2) over a long prefix, a chain over nothing committed, a decode
  // token: GQA groups of 3 and 4, head dims that fill the warp lanes exactly or not.
  const cases: [string, Omit<AttnCase, "kvDtype">][] = [
    ["head_dim=64, 12 heads / 4 kv, prefix 1000", {
      headDim: 64, nHeads: 12, nKv: 4,
      seqs: [{ committed: 1000, parents: tree(40) }, { committed: 0, parents: chain(5) }, { committed: 37, parents: [-1] }],
    }],
    ["head_dim=128, 32 heads / 8 kv, prefix 300", {
      headDim: 128, nHeads: 32, nKv: 8,
      seqs: [{ committed: 300, parents: tree(40) }, { committed: 0, parents: chain(3) }, { committed: 5, parents: [-1] }],
    }],
    ["head_dim=80 (lanes partly idle), 4 heads / 2 kv", {
      headDim: 80, nHeads: 4, nKv: 2,
      seqs: [{ committed: 77, parents: tree(33) }, { committed: 1, parents: [-1] }],
    }],
    ["head_dim=256, 8 heads / 8 kv", {
      headDim: 256, nHeads: 8, nKv: 8,
      seqs: [{ committed: 130, parents: tree(20) }],
    }],
    ["decode only: 1 token, 32 heads / 4 kv, prefix 1500 (many warps per block)", {
      headDim: 64, nHeads: 32, nKv: 4,
      seqs: [{ committed: 1500, parents: [-1] }],
    }],
  ];
  for (const kvDtype of [DType.F32, DType.F16] as const) {
    for (const [name, c] of cases) gpuTest(`${DTYPE_NAMES[kvDtype]} cache, ${name}`, () => runAttention({ kvDtype, ...c }));
  }

  gpuTest("F32 cache, prefill chain of 1100 tokens: mask over 35 words (two 1024-bit chunks)", () => {
    runAttention({ kvDtype: DType.F32, headDim: 64, nHeads: 2, nKv: 1, seqs: [{ committed: 20, parents: chain(1100) }] });
  }, 300_000);

  // ALiBi: the bias depends on each slot's rank among those a token sees, so the warps'
  // split of committed slots and the chunked batch list must count ranks as the CPU does.
  for (const kvDtype of [DType.F32, DType.F16] as const) {
    gpuTest(`${DTYPE_NAMES[kvDtype]} cache, ALiBi: MQA tree over a 1000-slot prefix, a chain, a decode token`, () => {
      runAttention({
        kvDtype, headDim: 64, nHeads: 8, nKv: 1, alibi: true,
        seqs: [{ committed: 1000, parents: tree(40) }, { committed: 0, parents: chain(5) }, { committed: 37, parents: [-1] }],
      });
    });
  }
  gpuTest("F32 cache, ALiBi: prefill chain of 1100 tokens (ranks across two 1024-bit chunks)", () => {
    runAttention({ kvDtype: DType.F32, headDim: 64, nHeads: 4, nKv: 4, alibi: true, seqs: [{ committed: 20, parents: chain(1100) }] });
  }, 300_000);
});

for (const kvDtype of [DType.F32, DType.F16] as const) {
  gpuTest(`${DTYPE_NAMES[kvDtype]} cache, kvMove: accepted path moves forward in order, every plane`, () => {
    const row = 4 * 64;
    const blockSize = 16;
    const poolBlocks = 40;
    const nPlanes = 6;
    const planeStride = poolBlocks * blockSize * row + 129; // planes need not be packed (nor 4-byte aligned in f16)
    const table = Int32Array.from(shuffle(Array.from({ length: poolBlocks }, (_, i) => i)));
    // dst[i] == src[i - 1] for some i: only an in-order copy gives the right result.
    const src = Int32Array.from([101, 102, 105, 106, 110, 111, 131]);
    const dst = Int32Array.from([100, 101, 102, 103, 104, 105, 106]);
    const total = nPlanes * planeStride;
    const [cc, cg] = put(planeData(kvDtype, total));
    const [tc, tg] = put(table);
    const [sc, sg] = put(src);
    const [dc, dg] = put(dst);
    cpu.kvMove(cc, kvDtype, nPlanes, planeStride, row, tc, blockSize, sc, dc, src.length);
    gpu.kvMove(cg, kvDtype, nPlanes, planeStride, row, tg, blockSize, sg, dg, src.length);
    expectSame("cache", bytes(gpu, cg, kvBytes(kvDtype, total)), bytes(cpu, cc, kvBytes(kvDtype, total)));
  });
}

// ---- errors found on the GPU --------------------------------------------------------------------

gpuTest("bad index contents: reported by the next sync (or at once when checked); the context survives", () => {
  const vocab = 10;
  const dim = 32;
  const table = gpu.alloc(vocab * dim * 4).ptr;
  const ids = gpu.alloc(8).ptr;
  gpu.upload(ids, Int32Array.from([1, vocab]));
  const out = gpu.alloc(2 * dim * 4).ptr;
  gpu.embedding(table, DType.F32, vocab, dim, ids, 2, out); // queued: no error yet
  expect(() => gpu.sync()).toThrow(/id 10 at index 1 is outside \[0, 10\)/);
  gpu.sync(); // cleared
  const z = new Float32Array(dim);
  gpu.download(z, out); // the good row ran

  // Attention reading a block the table does not have.
  const tbl = gpu.alloc(16).ptr;
  gpu.upload(tbl, Int32Array.from([3, -1, -1, -1]));
  const one = gpu.alloc(4).ptr;
  gpu.upload(one, Int32Array.from([0]));
  const cm = gpu.alloc(4).ptr;
  gpu.upload(cm, Int32Array.from([20]));
  const q = gpu.alloc(64 * 4).ptr;
  const kv = gpu.alloc(8 * 16 * 64 * 4).ptr;
  gpu.attention(q, 1, 1, 1, 64, kv, kv, DType.F32, tbl, 4, 16, one, cm, 0, 0, 0.125, gpu.alloc(64 * 4).ptr);
  expect(() => gpu.download(z, out)).toThrow(/sequence row 0 block 1 has block id -1/);

  const checked = CudaBackend.create({ checked: true });
  try {
    const t2 = checked.alloc(vocab * dim * 4).ptr;
    const i2 = checked.alloc(8).ptr;
    checked.upload(i2, Int32Array.from([-3, 0]));
    expect(() => checked.embedding(t2, DType.F32, vocab, dim, i2, 2, checked.alloc(2 * dim * 4).ptr)).toThrow(
      /id -3 at index 0/,
    );
  } finally {
    checked.close();
  }
});

gpuTest("argument errors match the CPU library's", () => {
  const p = gpu.alloc(1024).ptr;
  const pc = cpu.alloc(1024).ptr;
  const calls: [string, (be: Backend, x: Ptr) => void][] = [
    ["negative n", (be, x) => be.matmul(x, -1, 64, x + 512, DType.F32, 4, 0, x + 768)],
    ["k % 32", (be, x) => be.matmul(x, 1, 40, x + 512, DType.Q8_0, 4, 0, x + 768)],
    ["unknown dtype", (be, x) => be.embedding(x, 5 as DType, 4, 32, x, 1, x + 512)],
    ["rot_dim odd", (be, x) => be.rope(x, 1, 1, 64, 63, x, x, RopeLayout.Half)],
    ["GQA", (be, x) => be.attention(x, 1, 6, 4, 64, x, x, DType.F32, x, 1, 16, x, x, x, 1, 1, x)],
    ["kv dtype Q8_0", (be, x) => be.kvWrite(x, x, 1, 8, x, x, x, 1, 16, x, x, DType.Q8_0 as KVDType)],
    ["kv dtype 7", (be, x) => be.attention(x, 1, 4, 4, 64, x, x, 7 as KVDType, x, 1, 16, x, x, x, 1, 1, x)],
    ["kv dtype BF16", (be, x) => be.kvMove(x, DType.BF16 as KVDType, 1, 64, 8, x, 16, x, x, 1)],
    ["temperature", (be, x) => be.softmax(x, 1, 4, 0)],
  ];
  for (const [name, call] of calls) {
    let cpuMsg = "";
    let gpuMsg = "";
    try {
      call(cpu, pc);
    } catch (e) {
      cpuMsg = (e as Error).message;
    }
    try {
      call(gpu, p);
    } catch (e) {
      gpuMsg = (e as Error).message;
    }
    expect(cpuMsg).not.toBe("");
    expect(gpuMsg.replace(/^\w+ failed/, "")).toBe(cpuMsg.replace(/^\w+ failed/, ""));
    void name;
  }
});

gpuTest("probeBandwidth reads at GPU speed", () => {
  const bytes = 256 * 1024 * 1024;
  const b = gpu.alloc(bytes);
  const gbps = gpu.probeBandwidth(b.ptr, bytes, 5);
  expect(gbps).toBeGreaterThan(100);
  gpu.free(b);
});

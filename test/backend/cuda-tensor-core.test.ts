// Tensor-core matmul (from 16 tokens: F16, BF16, Q8_0, Q4_0) and the Q8_0 GEMV's 16-byte
// loads on the CUDA backend, against the CPU backend's matmul on fresh random data. GPU
// outputs are poisoned with NaN before every call, so an element the kernel does not
// write fails the comparison. Runs only with SPECINFER_GPU=1 on a machine with a GPU;
// elsewhere every test is reported as skipped, with the reason in its name.
//
//   SPECINFER_GPU=1 node_modules/.bin/bun test test/backend/cuda-tensor-core.test.ts --timeout 300000

import { afterAll, beforeAll, expect } from "bun:test";
import { type Backend, DType, DTYPE_NAMES, type Ptr } from "../../src/backend/backend.ts";
import { CpuBackend } from "../../src/backend/cpu.ts";
import type { CudaBackend } from "../../src/backend/cuda.ts";
import { SEED, randF32, randInt } from "../helpers/random.ts";
import { GPU, gpuTest } from "../helpers/gpu.ts";


let cpu: CpuBackend;
let gpu: CudaBackend;
beforeAll(async () => {
  if (!GPU) return;
  const { CudaBackend } = await import("../../src/backend/cuda.ts");
  cpu = CpuBackend.create({ threads: 2 });
  gpu = CudaBackend.create();
});
afterAll(() => {
  cpu?.close();
  gpu?.close();
});

const TENSOR_CORE_DTYPES = [DType.F16, DType.BF16, DType.Q8_0, DType.Q4_0];
const isQuant = (d: DType) => d === DType.Q8_0 || d === DType.Q4_0;

/** Copies bytes to `be` at `pad` bytes past a fresh 256-byte-aligned buffer. */
function put(be: Backend, data: ArrayBufferView, pad = 0): Ptr {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const b = be.alloc(bytes.byteLength + pad + 64);
  be.upload(b.ptr + pad, bytes);
  return b.ptr + pad;
}
function poisoned(be: Backend, count: number): Ptr {
  return put(be, new Float32Array(count).fill(Number.NaN));
}
function read(be: Backend, p: Ptr, count: number): Float32Array {
  const a = new Float32Array(count);
  be.download(a, p);
  return a;
}

/** A normal f16 with |x| in [2^(lo-15), 2^(hi-14)), built from its bits. */
function randF16Bits(lo: number, hi: number): number {
  return (randInt(2) << 15) | ((lo + randInt(hi - lo + 1)) << 10) | randInt(1024);
}
function randWeights(dtype: DType, rows: number, k: number): Uint8Array {
  const count = rows * k;
  if (dtype === DType.F16 || dtype === DType.BF16) {
    const u = new Uint16Array(count);
    const f = new Uint32Array(randF32(count).buffer);
    for (let i = 0; i < count; i++) u[i] = dtype === DType.F16 ? randF16Bits(10, 16) : f[i]! >>> 16;
    return new Uint8Array(u.buffer);
  }
  const bs = dtype === DType.Q8_0 ? 34 : 18;
  const out = new Uint8Array((count / 32) * bs);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < count / 32; b++) {
    dv.setUint16(b * bs, randF16Bits(8, 12), true); // scales 2^-7 .. 2^-2
    for (let j = 2; j < bs; j++) out[b * bs + j] = randInt(256);
  }
  return out;
}

/** |got - want| <= rtol * (|want| + 0.1 max|want|) everywhere (NaN fails). */
function expectClose(label: string, got: Float32Array, want: Float32Array, rtol: number): void {
  expect(got.length).toBe(want.length);
  let maxAbs = 0;
  for (const v of want) maxAbs = Math.max(maxAbs, Math.abs(v));
  for (let i = 0; i < want.length; i++) {
    const tol = rtol * (Math.abs(want[i]!) + 0.1 * maxAbs);
    if (!(Math.abs(got[i]! - want[i]!) <= tol)) {
      throw new Error(`${label}: index ${i}: gpu ${got[i]}, reference ${want[i]} (tolerance ${tol}); SEED=${SEED}`);
    }
  }
}

/** y = x . W^T (+ bias) on both backends; returns [gpu, cpu]. */
function both(dtype: DType, n: number, k: number, m: number, opts: { bias?: boolean; xPad?: number } = {}): [Float32Array, Float32Array] {
  const w = randWeights(dtype, m, k);
  const x = randF32(n * k);
  const bias = opts.bias ? randF32(m) : null;
  const run = (be: Backend, xPad: number) => {
    const y = poisoned(be, n * m);
    be.matmul(put(be, x, xPad), n, k, put(be, w), dtype, m, bias ? put(be, bias) : 0, y);
    return read(be, y, n * m);
  };
  return [run(gpu, opts.xPad ?? 0), run(cpu, 0)];
}

// Float weights: F16/BF16 activations split into two TF32 parts keep f32-like accuracy;
// quantized weights use the CPU's integer block math.
const tolOf = (d: DType) => (isQuant(d) ? 1e-2 : 1e-4);

for (const dtype of TENSOR_CORE_DTYPES) {
  const name = DTYPE_NAMES[dtype];
  // Float: k = 768, odd k = 771 (rows off 16-byte alignment) and k = 40 (one partial
  // stage); quantized: 3, 17 and 32 blocks. Odd m leaves a partial tile of rows.
  const shapes: [number, number][] = isQuant(dtype) ? [[96, 67], [544, 131], [1024, 67]] : [[768, 67], [771, 131], [40, 7]];
  gpuTest(`${name}: matmul == CPU for n in {1, 15, 16, 17, 64, 100}, odd k and m, every output written`, () => {
    for (const [k, m] of shapes) {
      for (const n of [1, 15, 16, 17, 64, 100]) {
        const [got, want] = both(dtype, n, k, m, { bias: n % 2 === 1 });
        expectClose(`${name} n=${n} k=${k} m=${m}`, got, want, tolOf(dtype));
      }
    }
  });

  gpuTest(`${name}: tensor-core rows (n=64) equal the single-token path's rows within float rounding`, () => {
    const [k, m] = isQuant(dtype) ? [1024, 300] : [768, 300];
    const n = 64;
    const w = put(gpu, randWeights(dtype, m, k));
    const x = randF32(n * k);
    const y = poisoned(gpu, n * m);
    gpu.matmul(put(gpu, x), n, k, w, dtype, m, 0, y);
    const all = read(gpu, y, n * m);
    for (const t of [0, 13, 31, 63]) {
      const y1 = poisoned(gpu, m);
      gpu.matmul(put(gpu, x.subarray(t * k, (t + 1) * k)), 1, k, w, dtype, m, 0, y1);
      // Same products, another summation order (and TF32 parts for float weights).
      expectClose(`${name} token ${t}`, all.subarray(t * m, (t + 1) * m), read(gpu, y1, m), 1e-5);
    }
  });
}

gpuTest("F16 and BF16 tensor cores: x 4 bytes off 16-byte alignment", () => {
  for (const dtype of [DType.F16, DType.BF16]) {
    const [got, want] = both(dtype, 33, 256, 70, { xPad: 4 });
    expectClose(`${DTYPE_NAMES[dtype]} unaligned x`, got, want, 1e-4);
  }
});

gpuTest("Q8_0 GEMV (16-byte loads of the words covering each row): weights at any 2-byte offset give the same bits, and the CPU's values", () => {
  const m = 77;
  for (const k of [1024, 544, 96]) { // 32, 17 and 3 blocks: rows of 1088, 578 and 102 bytes
    const wBytes = randWeights(DType.Q8_0, m, k);
    const wc = put(cpu, wBytes);
    const placements = [0, 2, 6, 14].map((pad) => put(gpu, wBytes, pad)); // 256-byte aligned + pad
    for (const n of [1, 3, 4, 8, 15]) {
      const x = randF32(n * k);
      const xg = put(gpu, x);
      const outs = placements.map((w) => {
        const y = poisoned(gpu, n * m);
        gpu.matmul(xg, n, k, w, DType.Q8_0, m, 0, y);
        return read(gpu, y, n * m);
      });
      for (const o of outs.slice(1)) expect(Array.from(o)).toEqual(Array.from(outs[0]!));
      const yc = poisoned(cpu, n * m);
      cpu.matmul(put(cpu, x), n, k, wc, DType.Q8_0, m, 0, yc);
      expectClose(`Q8_0 n=${n} k=${k}`, outs[0]!, read(cpu, yc, n * m), 1e-2);
    }
  }
});

gpuTest("tensor cores: weights at any 2-byte offset give the same bits (staged 16-byte words)", () => {
  for (const dtype of TENSOR_CORE_DTYPES) {
    const [k, m, n] = isQuant(dtype) ? [544, 45, 20] : [200, 45, 20];
    const wBytes = randWeights(dtype, m, k);
    const xg = put(gpu, randF32(n * k));
    const outs = [0, 2, 10].map((pad) => {
      const y = poisoned(gpu, n * m);
      gpu.matmul(xg, n, k, put(gpu, wBytes, pad), dtype, m, 0, y);
      return read(gpu, y, n * m);
    });
    for (const o of outs.slice(1)) expect(Array.from(o)).toEqual(Array.from(outs[0]!));
  }
});

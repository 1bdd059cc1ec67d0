// GPU micro-benchmark of the CUDA backend; prints one JSON object.
//
//   node_modules/.bin/bun bench/gpu.ts
//
// - matmul: weight GB/s (weight bytes / time per call) for a 1.1B-like MLP shape
//   (k=2048, m=5632) in F16 and Q8_0, at n=1 (decode) and n=16 (a token tree);
// - attention: time for 16 tree tokens over a 1024-token prefix (32 heads / 4 kv heads,
//   head_dim 64, as TinyLlama-1.1B);
// - probe: the library's streaming-read bandwidth.
// Times are host wall time over many back-to-back calls ending in one sync, so launch
// overhead is included, as in a forward pass.

import { DType, DTYPE_NAMES, type Ptr } from "../src/backend/backend.ts";
import { CudaBackend } from "../src/backend/cuda.ts";

const gpu = CudaBackend.create();

let seed = 12345;
const rand = () => {
  seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
  return seed / 4294967296;
};
const randF32 = (n: number) => Float32Array.from({ length: n }, () => rand() * 2 - 1);

function weights(dtype: DType, rows: number, k: number): Uint8Array {
  if (dtype === DType.F16) {
    const u = new Uint16Array(rows * k);
    for (let i = 0; i < u.length; i++) u[i] = ((rand() < 0.5 ? 1 : 0) << 15) | ((10 + Math.floor(rand() * 5)) << 10) | Math.floor(rand() * 1024);
    return new Uint8Array(u.buffer);
  }
  const out = new Uint8Array(((rows * k) / 32) * 34); // Q8_0
  const dv = new DataView(out.buffer);
  for (let b = 0; b < (rows * k) / 32; b++) {
    dv.setUint16(b * 34, 0x2000 | Math.floor(rand() * 1024), true);
    for (let j = 2; j < 34; j++) out[b * 34 + j] = Math.floor(rand() * 256);
  }
  return out;
}

function dev(data: ArrayBufferView): Ptr {
  const b = gpu.alloc(data.byteLength);
  gpu.upload(b.ptr, data);
  return b.ptr;
}

/** Seconds per call of fn, after warm-up. */
function time(fn: () => void, iters: number): number {
  for (let i = 0; i < 5; i++) fn();
  gpu.sync();
  const t0 = performance.now();
  for (let i = 0; i < iters; i++) fn();
  gpu.sync();
  return (performance.now() - t0) / 1000 / iters;
}

const round = (x: number, d = 1) => Math.round(x * 10 ** d) / 10 ** d;

const matmul: Record<string, { n: number; us: number; weight_gbps: number }> = {};
{
  const k = 2048;
  const m = 5632;
  for (const dtype of [DType.F16, DType.Q8_0]) {
    const wb = weights(dtype, m, k);
    const w = dev(wb);
    for (const n of [1, 16]) {
      const x = dev(randF32(n * k));
      const y = gpu.alloc(n * m * 4).ptr;
      const s = time(() => gpu.matmul(x, n, k, w, dtype, m, 0, y), 200);
      matmul[`${DTYPE_NAMES[dtype]}_n${n}`] = { n, us: round(s * 1e6, 2), weight_gbps: round(wb.byteLength / s / 1e9) };
    }
  }
}

let attention: Record<string, number>;
{
  const nHeads = 32;
  const nKv = 4;
  const headDim = 64;
  const row = nKv * headDim;
  const blockSize = 16;
  const prefix = 1024;
  const n = 16;
  const maxBlocks = Math.ceil((prefix + n) / blockSize);
  const poolBlocks = maxBlocks + 8;
  const table = Int32Array.from({ length: maxBlocks }, (_, i) => (i * 7) % poolBlocks); // scattered ids
  const k = dev(randF32(poolBlocks * blockSize * row));
  const v = dev(randF32(poolBlocks * blockSize * row));
  // A binary-ish tree of 16 nodes: parent of j is (j - 1) >> 1.
  const anc = new Uint32Array(n);
  for (let j = 0; j < n; j++) for (let a = j; a >= 0; a = a === 0 ? -1 : (a - 1) >> 1) anc[j] |= 1 << a;
  const q = dev(randF32(n * nHeads * headDim));
  const out = gpu.alloc(n * nHeads * headDim * 4).ptr;
  const args = [dev(table), dev(new Int32Array(n)), dev(Int32Array.from([prefix])), dev(anc)] as const;
  const s = time(
    () => gpu.attention(q, n, nHeads, nKv, headDim, k, v, DType.F32, args[0], maxBlocks, blockSize, args[1], args[2], args[3], 1, 0.125, out),
    200,
  );
  // K and V bytes every (token, head) block reads (GQA re-reads mostly hit L2).
  const touched = n * nHeads * (prefix + 4) * headDim * 4 * 2;
  attention = { tokens: n, prefix, us: round(s * 1e6, 2), touched_gbps: round(touched / s / 1e9) };
}

let probe_gbps: number;
{
  const bytes = 1024 * 1024 * 1024;
  const b = gpu.alloc(bytes);
  probe_gbps = round(gpu.probeBandwidth(b.ptr, bytes, 10));
  gpu.free(b);
}

console.log(JSON.stringify({ backend: "cuda", matmul, attention, probe_gbps }, null, 2));
gpu.close();

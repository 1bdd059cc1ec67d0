// bun bench/matmul.ts — si_matmul cost against the batch size n on TinyLlama-1.1B shapes
// (FFN up/down, attention out, the 4-KV-head K/V projection, lm_head) and a 110M shape,
// weights cold (each call reads a different copy, the copies together exceed the L3), with the DRAM bandwidth probe in the same run. JSON on stdout.
//   THREADS=2 SHAPES=2048x5632,5632x2048 DTYPES=Q8_0 NS=1,16 bun bench/matmul.ts
// Shapes are k x m (y[n, m] = x[n, k] . W[m, k]^T); ratioToN1 = t(n) / t(first n).

import { DType, DTYPE_NAMES, dtypeBytes } from "../src/backend/backend";
import { CpuBackend } from "../src/backend/cpu";

const THREADS = Number(process.env.THREADS ?? 2);
const COLD_BYTES = 192 << 20; // weight copies cycled through: well over the 32 MiB L3
const REPEATS = Number(process.env.REPEATS ?? 5);
const list = (v: string | undefined, d: string) => (v ?? d).split(",");
const SHAPES = list(process.env.SHAPES, "2048x5632,5632x2048,2048x2048,2048x256,2048x32000,768x2304").map((s) => s.split("x").map(Number));
const DTYPES = list(process.env.DTYPES, "F16,Q8_0,Q4_0").map((n) => DType[n as keyof typeof DType]);
const NS = list(process.env.NS, "1,2,3,4,5,6,8,12,16,24,32,64").map(Number);

const be = CpuBackend.create({ threads: THREADS });

let seed = 12345;
const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;

/** One valid weight matrix (finite f16 values, sane block scales). */
function weights(dtype: DType, k: number, m: number): Uint8Array {
  const bytes = new Uint8Array(dtypeBytes(dtype, k * m));
  const dv = new DataView(bytes.buffer);
  const f16 = new Float16Array(1);
  const f16u = new Uint16Array(f16.buffer);
  const half = (x: number) => ((f16[0] = x), f16u[0]);
  if (dtype === DType.F16) {
    for (let i = 0; i < k * m; i++) dv.setUint16(2 * i, half(rnd() * 0.05), true);
  } else {
    const bs = dtype === DType.Q8_0 ? 34 : 18;
    for (let b = 0; b < (k * m) / 32; b++) {
      dv.setUint16(b * bs, half(0.001 + Math.abs(rnd()) * 0.01), true);
      for (let j = 2; j < bs; j++) bytes[b * bs + j] = (rnd() * 128 + 128) & 0xff;
    }
  }
  return bytes;
}

function probe(): number {
  const bytes = 256 << 20;
  const buf = be.alloc(bytes);
  new Uint8Array(buf.host!).fill(1);
  let best = 0;
  for (let r = 0; r < 3; r++) best = Math.max(best, be.probeBandwidth(buf.ptr, bytes, 2));
  be.free(buf);
  return best;
}

const bandwidth = probe();
process.stderr.write(`[bench:matmul] probe ${bandwidth.toFixed(1)} GB/s, ${THREADS} threads\n`);
const results = [];
for (const [k, m] of SHAPES) {
  for (const dtype of DTYPES) {
    const w = weights(dtype, k, m);
    const copies = Math.max(2, Math.ceil(COLD_BYTES / w.length));
    const bufs = Array.from({ length: copies }, () => {
      const b = be.alloc(w.length);
      be.upload(b.ptr, w);
      return b;
    });
    const nmax = Math.max(...NS);
    const x = be.alloc(nmax * k * 4);
    const xv = new Float32Array(x.host!);
    for (let i = 0; i < xv.length; i++) xv[i] = rnd();
    const y = be.alloc(nmax * m * 4);
    let base = 0;
    for (const n of NS) {
      let best = Infinity;
      for (let r = 0; r < REPEATS; r++) {
        const t = performance.now();
        for (const b of bufs) be.matmul(x.ptr, n, k, b.ptr, dtype, m, 0, y.ptr);
        best = Math.min(best, ((performance.now() - t) * 1000) / copies);
      }
      if (n === NS[0]) base = best;
      const row = {
        shape: `${k}x${m}`, dtype: DTYPE_NAMES[dtype], n,
        us: Math.round(best * 10) / 10,
        weightGBps: Math.round((w.length / best / 1e3) * 10) / 10,
        gflops: Math.round(((2 * n * k * m) / best / 1e3) * 10) / 10,
        ratioToN1: Math.round((best / base) * 100) / 100,
      };
      results.push(row);
      process.stderr.write(`[bench:matmul] ${JSON.stringify(row)}\n`);
    }
    for (const b of bufs) be.free(b);
    be.free(x);
    be.free(y);
  }
}
be.close();
console.log(JSON.stringify({ bench: "matmul", threads: THREADS, probeGBps: Math.round(bandwidth * 10) / 10, results }, null, 2));

// CPU kernels: SIMD (threads: 2) against the scalar reference kernels on fresh random
// data, a few ops against plain float64 TypeScript, and bad input -> BackendError.
// Each run draws a new seed; a failure message carries it (SEED=<n> reproduces it).

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Activation, BackendError, DType, DTYPE_NAMES, RopeLayout, type DeviceBuffer, type KVDType } from "../../src/backend/backend.ts";
import { CpuBackend } from "../../src/backend/cpu.ts";
import { SEED, rand, randInt, randF32, shuffle } from "../helpers/random.ts";
import { gelu, geluTanh, layerNorm, relu } from "../helpers/reference-math.ts";

const simd = CpuBackend.create({ threads: 2 });
const ref = CpuBackend.create({ reference: true, threads: 1 });
const live: DeviceBuffer[] = [];
afterAll(() => {
  for (const b of live) simd.free(b);
  simd.close();
  ref.close();
});

/** Device copy of `data` (plus `pad` leading bytes, to test unaligned pointers). */
function dev(data: ArrayBufferView, pad = 0): number {
  const b = simd.alloc(data.byteLength + pad + 64);
  live.push(b);
  new Uint8Array(b.host!, pad, data.byteLength).set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  return b.ptr + pad;
}
function zeros(bytes: number): DeviceBuffer {
  const b = simd.alloc(bytes);
  live.push(b);
  return b;
}
const f32Of = (b: DeviceBuffer, count?: number) => new Float32Array(b.host!, 0, count);

/** Throws (with the seed) unless |got - want| <= atol + rtol * scale[i] (scale defaults to |want|). */
function expectClose(
  label: string, got: ArrayLike<number>, want: ArrayLike<number>, rtol: number, atol: number,
  scale?: ArrayLike<number>,
): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    const tol = atol + rtol * (scale ? scale[i] : Math.abs(want[i]));
    const d = Math.abs(got[i] - want[i]);
    if (!(d <= tol)) {
      throw new Error(`${label}: index ${i}: got ${got[i]}, want ${want[i]} (|diff| ${d} > ${tol}); SEED=${SEED}`);
    }
  }
}

// ---- weight encoders (GGML layouts, as in ffi/specinfer.h) ------------------------------

const h16 = new Float16Array(1);
const h16u = new Uint16Array(h16.buffer);
const f16Bits = (x: number) => ((h16[0] = x), h16u[0]);
const f16Val = (bits: number) => ((h16u[0] = bits), h16[0]);
const f32b = new Float32Array(1);
const u32b = new Uint32Array(f32b.buffer);
function bf16Bits(x: number): number {
  f32b[0] = x;
  const u = u32b[0];
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
const bf16Val = (bits: number) => ((u32b[0] = bits << 16), f32b[0]);

interface Encoded {
  bytes: Uint8Array;
  /** The exact values the bytes stand for, row-major [rows][k]. */
  values: Float64Array;
}

function encode(dtype: DType, x: Float32Array, k: number): Encoded {
  const rows = x.length / k;
  const values = new Float64Array(x.length);
  switch (dtype) {
    case DType.F32: {
      values.set(x);
      return { bytes: new Uint8Array(x.slice().buffer), values };
    }
    case DType.F16:
    case DType.BF16: {
      const u = new Uint16Array(x.length);
      for (let i = 0; i < x.length; i++) {
        u[i] = dtype === DType.F16 ? f16Bits(x[i]) : bf16Bits(x[i]);
        values[i] = dtype === DType.F16 ? f16Val(u[i]) : bf16Val(u[i]);
      }
      return { bytes: new Uint8Array(u.buffer), values };
    }
    case DType.Q8_0: {
      const out = new Uint8Array((x.length / 32) * 34);
      const dv = new DataView(out.buffer);
      for (let b = 0; b < x.length / 32; b++) {
        let amax = 0;
        for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]));
        const d = amax / 127;
        const id = d ? 1 / d : 0;
        const dbits = f16Bits(d);
        dv.setUint16(b * 34, dbits, true);
        for (let j = 0; j < 32; j++) {
          const q = Math.max(-127, Math.min(127, Math.round(x[b * 32 + j] * id)));
          dv.setInt8(b * 34 + 2 + j, q);
          values[b * 32 + j] = Math.fround(q * f16Val(dbits));
        }
      }
      return { bytes: out, values };
    }
    case DType.Q4_0: {
      const out = new Uint8Array((x.length / 32) * 18);
      const dv = new DataView(out.buffer);
      for (let b = 0; b < x.length / 32; b++) {
        let max = 0;
        for (let j = 0; j < 32; j++) if (Math.abs(x[b * 32 + j]) > Math.abs(max)) max = x[b * 32 + j];
        const d = max / -8;
        const id = d ? 1 / d : 0;
        const dbits = f16Bits(d);
        dv.setUint16(b * 18, dbits, true);
        const q = (j: number) => Math.min(15, Math.max(0, Math.trunc(x[b * 32 + j] * id + 8.5)));
        for (let j = 0; j < 16; j++) {
          const lo = q(j);
          const hi = q(j + 16);
          out[b * 18 + 2 + j] = lo | (hi << 4);
          values[b * 32 + j] = Math.fround((lo - 8) * f16Val(dbits));
          values[b * 32 + j + 16] = Math.fround((hi - 8) * f16Val(dbits));
        }
      }
      return { bytes: out, values };
    }
  }
  throw new Error(`no encoder for ${dtype} (${rows} rows)`);
}

const DTYPES = [DType.F32, DType.F16, DType.BF16, DType.Q8_0, DType.Q4_0];
const isQuant = (d: DType) => d === DType.Q8_0 || d === DType.Q4_0;

// ---- matmul ----------------------------------------------------------------------------

describe("matmul", () => {
  for (const dtype of DTYPES) {
    const shapes = isQuant(dtype)
      ? [[1, 32, 1], [1, 96, 7], [3, 64, 33], [5, 256, 64], [17, 160, 130], [4, 768, 300]]
      : [[1, 33, 1], [1, 72, 7], [3, 64, 33], [5, 129, 64], [17, 200, 130], [4, 768, 300]];
    test(`${DTYPE_NAMES[dtype]}: SIMD == reference == float64`, () => {
      for (const [n, k, m] of shapes) {
        const x = randF32(n * k, 2);
        const w = encode(dtype, randF32(m * k, 0.5), k);
        const withBias = rand() < 0.5;
        const bias = randF32(m);
        // Unaligned weights (safetensors data may be 2-byte aligned).
        const wp = dev(w.bytes, dtype === DType.F32 ? 4 * randInt(2) + 2 * randInt(2) : 2 * randInt(2));
        const xp = dev(x);
        const bp = withBias ? dev(bias) : 0;
        const ys = zeros(n * m * 4);
        const yr = zeros(n * m * 4);
        simd.matmul(xp, n, k, wp, dtype, m, bp, ys.ptr);
        ref.matmul(xp, n, k, wp, dtype, m, bp, yr.ptr);

        const want = new Float64Array(n * m);
        const scale = new Float64Array(n * m); // sum |w x|
        const qerr = new Float64Array(n * m); // bound of the activation quantization error
        for (let t = 0; t < n; t++) {
          const amax = new Float64Array(k / 32);
          if (isQuant(dtype)) for (let i = 0; i < k; i++) amax[i >> 5] = Math.max(amax[i >> 5], Math.abs(x[t * k + i]));
          for (let r = 0; r < m; r++) {
            let acc = withBias ? bias[r] : 0;
            let sc = 0;
            let qe = 0;
            for (let i = 0; i < k; i++) {
              const wv = w.values[r * k + i];
              acc += wv * x[t * k + i];
              sc += Math.abs(wv * x[t * k + i]);
              if (isQuant(dtype)) qe += (Math.abs(wv) * amax[i >> 5]) / 127 / 2;
            }
            want[t * m + r] = acc;
            scale[t * m + r] = sc + 1e-3;
            qerr[t * m + r] = qe;
          }
        }
        const label = `${DTYPE_NAMES[dtype]} n=${n} k=${k} m=${m}`;
        expectClose(`${label} SIMD vs reference`, f32Of(ys), f32Of(yr), 2e-5, 0, scale);
        const got = f32Of(ys);
        for (let i = 0; i < want.length; i++) {
          const tol = (isQuant(dtype) ? qerr[i] * 1.01 : 0) + 2e-5 * scale[i];
          if (!(Math.abs(got[i] - want[i]) <= tol)) {
            throw new Error(`${label} vs float64: index ${i}: got ${got[i]}, want ${want[i]}, tol ${tol}; SEED=${SEED}`);
          }
        }
      }
    });
  }

  // The engine's invariant: a token's row of y does not depend on the batch around it
  // (n, the other tokens) nor on the thread count, bit for bit.
  const single = CpuBackend.create({ threads: 1 });
  afterAll(() => single.close());
  for (const dtype of DTYPES) {
    test(`${DTYPE_NAMES[dtype]}: a token's result is bit-identical for n=1..64, threads 1 and 2`, () => {
      const shapes = isQuant(dtype) ? [[96, 37], [288, 130], [512, 300]] : [[33, 37], [288, 130], [200, 300]];
      for (const [k, m] of shapes) {
        const nMax = 64;
        const x = randF32(nMax * k, 2);
        const w = encode(dtype, randF32(m * k, 0.5), k);
        const wp = dev(w.bytes, 2 * randInt(2));
        const bp = rand() < 0.5 ? dev(randF32(m)) : 0;
        const xp = dev(x);
        const alone = new Float32Array(nMax * m);
        const y = zeros(nMax * m * 4);
        for (let t = 0; t < nMax; t++) {
          single.matmul(xp + t * k * 4, 1, k, wp, dtype, m, bp, y.ptr);
          alone.set(f32Of(y, m), t * m);
        }
        for (const be of [single, simd]) {
          // Quantized: token tiles of up to 16, balanced (17 = 9 + 8, 33 = 11 x 3).
          for (const n of [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 31, 32, 33, 47, 64]) {
            // Batches at different offsets, so each token sits at several tile positions.
            for (const t0 of n === nMax ? [0] : [0, nMax - n]) {
              be.matmul(xp + t0 * k * 4, n, k, wp, dtype, m, bp, y.ptr);
              const got = f32Of(y, n * m);
              for (let i = 0; i < n * m; i++) {
                const want = alone[t0 * m + i];
                if (!Object.is(got[i], want)) {
                  const [t, r] = [t0 + Math.floor(i / m), i % m];
                  throw new Error(
                    `${DTYPE_NAMES[dtype]} k=${k} m=${m} threads=${be.threads} n=${n}: token ${t} row ${r}: ` +
                      `${got[i]} in the batch, ${want} alone; SEED=${SEED}`,
                  );
                }
              }
            }
          }
        }
      }
    });
  }

  test("matmul reuses its scratch across shapes and stays right", () => {
    for (const [n, k] of [[8, 512], [2, 64], [8, 512], [1, 1024]]) {
      const m = 48;
      const x = randF32(n * k);
      const w = encode(DType.Q8_0, randF32(m * k), k);
      const xp = dev(x);
      const wp = dev(w.bytes);
      const ys = zeros(n * m * 4);
      const yr = zeros(n * m * 4);
      simd.matmul(xp, n, k, wp, DType.Q8_0, m, 0, ys.ptr);
      ref.matmul(xp, n, k, wp, DType.Q8_0, m, 0, yr.ptr);
      expectClose(`Q8_0 scratch n=${n} k=${k}`, f32Of(ys), f32Of(yr), 1e-5, 1e-5);
    }
  });
});

// ---- embedding -------------------------------------------------------------------------

describe("embedding", () => {
  for (const dtype of DTYPES) {
    test(`${DTYPE_NAMES[dtype]}: SIMD == reference == decoded table`, () => {
      const vocab = 50;
      const dim = isQuant(dtype) ? 96 : 72;
      const table = encode(dtype, randF32(vocab * dim), dim);
      const tp = dev(table.bytes, 2);
      const n = 9;
      const ids = Int32Array.from({ length: n }, () => randInt(vocab));
      ids[0] = vocab - 1;
      const ip = dev(ids);
      const os = zeros(n * dim * 4);
      const or = zeros(n * dim * 4);
      simd.embedding(tp, dtype, vocab, dim, ip, n, os.ptr);
      ref.embedding(tp, dtype, vocab, dim, ip, n, or.ptr);
      const want = new Float64Array(n * dim);
      for (let i = 0; i < n; i++) for (let j = 0; j < dim; j++) want[i * dim + j] = table.values[ids[i] * dim + j];
      expectClose("embedding SIMD vs reference", f32Of(os), f32Of(or), 0, 0);
      expectClose("embedding vs decoded", f32Of(os), want, 0, 0);
    });
  }
});

// ---- rmsnorm / rope / elementwise ------------------------------------------------------

test("rmsnorm: SIMD == reference == float64, in place too", () => {
  for (const [n, dim] of [[1, 64], [3, 77], [16, 768]]) {
    const x = randF32(n * dim, 3);
    const w = randF32(dim);
    const xp = dev(x);
    const wp = dev(w);
    const ys = zeros(n * dim * 4);
    const yr = zeros(n * dim * 4);
    simd.rmsnorm(xp, wp, n, dim, 1e-5, ys.ptr);
    ref.rmsnorm(xp, wp, n, dim, 1e-5, yr.ptr);
    const want = new Float64Array(n * dim);
    for (let i = 0; i < n; i++) {
      let ss = 0;
      for (let j = 0; j < dim; j++) ss += x[i * dim + j] ** 2;
      const s = 1 / Math.sqrt(ss / dim + 1e-5);
      for (let j = 0; j < dim; j++) want[i * dim + j] = x[i * dim + j] * s * w[j];
    }
    expectClose(`rmsnorm n=${n} dim=${dim} SIMD vs ref`, f32Of(ys), f32Of(yr), 1e-5, 1e-6);
    expectClose(`rmsnorm n=${n} dim=${dim} vs f64`, f32Of(ys), want, 1e-5, 1e-6);
    simd.rmsnorm(xp, wp, n, dim, 1e-5, xp); // y == x
    const inPlace = new Float32Array(n * dim);
    simd.download(inPlace, xp);
    expectClose("rmsnorm in place", inPlace, f32Of(ys), 0, 0);
  }
});

describe("rope", () => {
  for (const layout of [RopeLayout.Half, RopeLayout.Interleaved]) {
    test(`${RopeLayout[layout]}: SIMD == reference == float64`, () => {
      for (const [nHeads, headDim, rotDim] of [[4, 64, 64], [2, 48, 32], [3, 128, 128], [1, 40, 24]]) {
        const n = 7;
        const x = randF32(n * nHeads * headDim, 2);
        const pos = Int32Array.from({ length: n }, () => randInt(4096));
        pos[0] = 0;
        pos[1] = 4095;
        const invFreq = Float32Array.from({ length: rotDim / 2 }, (_, j) => 10000 ** ((-2 * j) / rotDim));
        const xs = dev(x);
        const xr = dev(x);
        const pp = dev(pos);
        const fp = dev(invFreq);
        simd.rope(xs, n, nHeads, headDim, rotDim, pp, fp, layout);
        ref.rope(xr, n, nHeads, headDim, rotDim, pp, fp, layout);
        const want = Float64Array.from(x);
        const scale = new Float64Array(x.length);
        const half = rotDim / 2;
        for (let i = 0; i < n; i++) {
          for (let h = 0; h < nHeads; h++) {
            const o = (i * nHeads + h) * headDim;
            for (let j = 0; j < half; j++) {
              // The angle is an f32 product, as in HF (float32 inv_freq @ positions).
              const ang = Math.fround(pos[i] * invFreq[j]);
              const [ia, ib] = layout === RopeLayout.Half ? [j, j + half] : [2 * j, 2 * j + 1];
              const a = x[o + ia];
              const b = x[o + ib];
              want[o + ia] = a * Math.cos(ang) - b * Math.sin(ang);
              want[o + ib] = a * Math.sin(ang) + b * Math.cos(ang);
              scale[o + ia] = scale[o + ib] = Math.abs(a) + Math.abs(b);
            }
            for (let j = rotDim; j < headDim; j++) scale[o + j] = Math.abs(x[o + j]);
          }
        }
        const gs = new Float32Array(x.length);
        const gr = new Float32Array(x.length);
        simd.download(gs, xs);
        simd.download(gr, xr);
        const label = `rope ${RopeLayout[layout]} heads=${nHeads} hd=${headDim} rot=${rotDim}`;
        expectClose(`${label} SIMD vs ref`, gs, gr, 1e-6, 1e-7, scale);
        expectClose(`${label} vs f64`, gs, want, 1e-6, 1e-7, scale);
      }
    });
  }
});

test("swiglu and add: SIMD == reference == float64", () => {
  for (const count of [1, 15, 1000, 100_003]) {
    const g = randF32(count, 8);
    const u = randF32(count, 2);
    const gp = dev(g);
    const up = dev(u);
    const os = zeros(count * 4);
    const or = zeros(count * 4);
    simd.swiglu(gp, up, count, os.ptr);
    ref.swiglu(gp, up, count, or.ptr);
    const want = Float64Array.from(g, (gv, i) => (gv / (1 + Math.exp(-gv))) * u[i]);
    expectClose(`swiglu ${count} SIMD vs ref`, f32Of(os), f32Of(or), 2e-6, 1e-7);
    expectClose(`swiglu ${count} vs f64`, f32Of(os), want, 2e-6, 1e-7);

    const xs = dev(g);
    const xr = dev(g);
    simd.add(xs, up, count);
    ref.add(xr, up, count);
    const as = new Float32Array(count);
    const ar = new Float32Array(count);
    simd.download(as, xs);
    simd.download(ar, xr);
    expectClose(`add ${count}`, as, ar, 0, 0);
    expectClose(`add ${count} vs f64`, as, Float64Array.from(g, (gv, i) => Math.fround(gv + u[i])), 0, 0);
  }
});

describe("layernorm", () => {
  for (const withBias of [true, false]) {
    test(`${withBias ? "with" : "without"} bias: SIMD == reference == float64, in place too`, () => {
      for (const [n, dim] of [[1, 64], [3, 77], [16, 768]]) {
        // An offset mean: the centered variance must not cancel.
        const x = Float32Array.from(randF32(n * dim, 3), (v) => v + 40);
        const w = randF32(dim);
        const b = randF32(dim);
        const xp = dev(x);
        const wp = dev(w);
        const bp = withBias ? dev(b) : 0;
        const ys = zeros(n * dim * 4);
        const yr = zeros(n * dim * 4);
        simd.layernorm(xp, wp, bp, n, dim, 1e-5, ys.ptr);
        ref.layernorm(xp, wp, bp, n, dim, 1e-5, yr.ptr);
        const want = new Float64Array(n * dim);
        const scale = new Float64Array(n * dim);
        for (let i = 0; i < n; i++) {
          const row = x.subarray(i * dim, (i + 1) * dim);
          want.set(layerNorm(row, w, withBias ? b : null, 1e-5), i * dim);
          // Error scale: the terms summed (|normalized * w|, |bias|) and |w|, which
          // f32 rounding of the inputs near their mean (one standard deviation ~ 1.7) scales.
          const plain = layerNorm(row, Float64Array.from(w, Math.abs), null, 1e-5);
          for (let j = 0; j < dim; j++) scale[i * dim + j] = Math.abs(plain[j]) + Math.abs(w[j]) + (withBias ? Math.abs(b[j]) : 0);
        }
        const label = `layernorm n=${n} dim=${dim}`;
        expectClose(`${label} SIMD vs ref`, f32Of(ys), f32Of(yr), 2e-5, 1e-6, scale);
        expectClose(`${label} vs f64`, f32Of(ys), want, 2e-5, 1e-6, scale);
        simd.layernorm(xp, wp, bp, n, dim, 1e-5, xp); // y == x
        const inPlace = new Float32Array(n * dim);
        simd.download(inPlace, xp);
        expectClose(`${label} in place`, inPlace, f32Of(ys), 0, 0);
      }
    });
  }
});

describe("activation", () => {
  const kinds: [Activation, (x: number) => number][] = [[Activation.ReLU, relu], [Activation.GELU, gelu], [Activation.GELUTanh, geluTanh]];
  for (const [kind, f] of kinds) {
    test(`${Activation[kind]}: SIMD == reference == float64, in place too`, () => {
      for (const count of [1, 15, 1000, 100_003]) {
        const x = randF32(count, 8);
        x[0] = count > 1 ? -30 : 0; // saturated tails
        if (count > 1) x[1] = 30;
        const xp = dev(x);
        const os = zeros(count * 4);
        const or = zeros(count * 4);
        simd.activation(xp, count, kind, os.ptr);
        ref.activation(xp, count, kind, or.ptr);
        const want = Float64Array.from(x, f);
        // |x| scales the error: the GELUs are x times a function in [0, 1].
        const scale = Float64Array.from(x, Math.abs);
        expectClose(`${Activation[kind]} ${count} SIMD vs ref`, f32Of(os), f32Of(or), 4e-7, 1e-7, scale);
        expectClose(`${Activation[kind]} ${count} vs f64`, f32Of(os), want, 4e-7, 1e-7, scale);
        simd.activation(xp, count, kind, xp);
        const inPlace = new Float32Array(count);
        simd.download(inPlace, xp);
        expectClose(`${Activation[kind]} in place`, inPlace, f32Of(os), 0, 0);
      }
    });
  }
});

test("clamp: SIMD == reference == float64 clip to [-limit, limit]; a non-positive limit is refused", () => {
  for (const count of [1, 15, 1000, 100_003]) {
    const x = randF32(count, 8);
    const xs = dev(x);
    const xr = dev(x);
    simd.clamp(xs, count, 2.5);
    ref.clamp(xr, count, 2.5);
    const gs = new Float32Array(count);
    const gr = new Float32Array(count);
    simd.download(gs, xs);
    simd.download(gr, xr);
    const want = Float64Array.from(x, (v) => Math.min(Math.max(v, -2.5), 2.5));
    expectClose(`clamp ${count} SIMD vs ref`, gs, gr, 0, 0);
    expectClose(`clamp ${count} vs f64`, gs, want, 0, 0);
  }
  expect(() => simd.clamp(dev(new Float32Array(4)), 4, 0)).toThrow(/si_clamp: limit=0 must be positive/);
});

describe("addRows (learned positions)", () => {
  for (const dtype of [DType.F32, DType.F16, DType.BF16, DType.Q8_0, DType.Q4_0]) {
    test(`${DTYPE_NAMES[dtype]}: x += table[ids + offset], SIMD == reference == float64`, () => {
      for (const dim of [32, 96, 544]) {
        const rows = 20;
        const offset = 2;
        const table = encode(dtype, randF32(rows * dim), dim);
        const n = 9;
        const ids = Int32Array.from({ length: n }, () => randInt(rows - offset));
        ids[0] = -offset; // row 0
        ids[1] = rows - 1 - offset; // the last row
        const x = randF32(n * dim, 2);
        const tp = dev(table.bytes);
        const ip = dev(ids);
        const xs = dev(x);
        const xr = dev(x);
        simd.addRows(xs, tp, dtype, rows, dim, ip, n, offset);
        ref.addRows(xr, tp, dtype, rows, dim, ip, n, offset);
        const want = Float64Array.from(x, (v, k) => v + table.values[(ids[Math.floor(k / dim)] + offset) * dim + (k % dim)]);
        const gs = new Float32Array(n * dim);
        const gr = new Float32Array(n * dim);
        simd.download(gs, xs);
        simd.download(gr, xr);
        expectClose(`addRows ${DTYPE_NAMES[dtype]} dim=${dim} SIMD vs ref`, gs, gr, 0, 0);
        expectClose(`addRows ${DTYPE_NAMES[dtype]} dim=${dim} vs f64`, gs, Float64Array.from(want, Math.fround), 0, 0);
      }
    });
  }
  test("an id outside the table (after the offset) is refused, naming it", () => {
    const tp = dev(new Float32Array(4 * 8));
    const xp = dev(new Float32Array(2 * 8));
    expect(() => simd.addRows(xp, tp, DType.F32, 4, 8, dev(Int32Array.from([0, 2])), 2, 2)).toThrow(/si_add_rows: id 2 \+ offset 2 at index 1 is outside \[0, 4\)/);
    expect(() => simd.addRows(xp, tp, DType.F32, 4, 8, dev(Int32Array.from([-3])), 1, 2)).toThrow(/id -3 \+ offset 2 at index 0/);
  });
});

test("softmax and argmax: SIMD == reference", () => {
  for (const [rows, n] of [[1, 5], [3, 100], [4, 32000]]) {
    const x = randF32(rows * n, 10);
    x[3 % n] = -Infinity;
    const xs = dev(x);
    const xr = dev(x);
    simd.softmax(xs, rows, n, 0.7);
    ref.softmax(xr, rows, n, 0.7);
    const gs = new Float32Array(rows * n);
    const gr = new Float32Array(rows * n);
    simd.download(gs, xs);
    simd.download(gr, xr);
    expectClose(`softmax ${rows}x${n}`, gs, gr, 1e-5, 1e-9);
    for (let r = 0; r < rows; r++) {
      let s = 0;
      for (let j = 0; j < n; j++) s += gs[r * n + j];
      expect(Math.abs(s - 1)).toBeLessThan(1e-4);
    }

    // Ties: the lowest index wins.
    const y = randF32(rows * n);
    for (let r = 0; r < rows; r++) {
      const a = randInt(n);
      const b = randInt(n);
      y[r * n + a] = 5;
      y[r * n + b] = 5;
    }
    const yp = dev(y);
    const os = zeros(rows * 4);
    const or = zeros(rows * 4);
    simd.argmax(yp, rows, n, os.ptr);
    ref.argmax(yp, rows, n, or.ptr);
    const want = Array.from({ length: rows }, (_, r) => {
      let best = 0;
      for (let j = 1; j < n; j++) if (y[r * n + j] > y[r * n + best]) best = j;
      return best;
    });
    expect(Array.from(new Int32Array(os.host!, 0, rows))).toEqual(want);
    expect(Array.from(new Int32Array(or.host!, 0, rows))).toEqual(want);
  }
});

// ---- paged KV cache and tree attention ---------------------------------------------------

const KV_DTYPES: KVDType[] = [DType.F32, DType.F16];

/** Throws (with the seed) at the first byte where `got` and `want` differ. */
function expectBytes(label: string, got: Uint8Array, want: Uint8Array): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) throw new Error(`${label}: byte ${i}: got ${got[i]}, want ${want[i]}; SEED=${SEED}`);
  }
}

function bytesAt(p: number, count: number): Uint8Array {
  const out = new Uint8Array(count);
  simd.download(out, p);
  return out;
}

describe("paged KV + tree attention", () => {
  for (const kvDtype of KV_DTYPES) {
    const kvName = DTYPE_NAMES[kvDtype];
    const elem = kvDtype === DType.F16 ? 2 : 4;
    // f16 rounding (to nearest) moves a value by at most u relative, or eta absolute
    // for f16 subnormals; an f32 cache stores values exactly.
    const u = kvDtype === DType.F16 ? 2 ** -11 : 0;
    const eta = kvDtype === DType.F16 ? 2 ** -25 : 0;
    for (const headDim of [32, 48, 40, 128]) {
      test(`${kvName} cache, head_dim=${headDim}: kvWrite stores K/V rounded to ${kvName}; attention (tree, W>1, committed=0, GQA) == float64`, () => {
        const nHeads = 4;
        const nKv = 2;
        const row = nKv * headDim;
        const blockSize = 4;
        const maxBlocks = 32;
        const poolBlocks = 80;
        // Sequence rows: a 70-node tree over 13 committed slots (W = 3), a 5-token chain
        // over nothing committed, a single decode token over 9 committed slots.
        const seqs = [
          { committed: 13, parents: Array.from({ length: 70 }, (_, j) => (j === 0 ? -1 : randInt(j + 1) - 1)) },
          { committed: 0, parents: [-1, 0, 1, 2, 3] },
          { committed: 9, parents: [-1] },
        ];
        const words = 3;
        // Non-contiguous block ids: a shuffled pool.
        const perm = Array.from({ length: poolBlocks }, (_, i) => i);
        for (let i = perm.length - 1; i > 0; i--) {
          const j = randInt(i + 1);
          [perm[i], perm[j]] = [perm[j], perm[i]];
        }
        const tables = new Int32Array(seqs.length * maxBlocks).fill(-1);
        let next = 0;
        seqs.forEach((s, si) => {
          const need = Math.ceil((s.committed + s.parents.length) / blockSize);
          for (let b = 0; b < need; b++) tables[si * maxBlocks + b] = perm[next++];
        });
        // The planes hold f32 data rounded to the cache dtype; `values` is what they store.
        const kPlane = randF32(poolBlocks * blockSize * row);
        const vPlane = randF32(poolBlocks * blockSize * row);
        const kStored = encode(kvDtype, kPlane, row);
        const vStored = encode(kvDtype, vPlane, row);

        // Batch: tokens of all rows interleaved.
        const order: [number, number][] = [];
        seqs.forEach((s, si) => s.parents.forEach((_, j) => order.push([si, j])));
        for (let i = order.length - 1; i > 0; i--) {
          const j = randInt(i + 1);
          [order[i], order[j]] = [order[j], order[i]];
        }
        const n = order.length;
        const seqArr = Int32Array.from(order, ([s]) => s);
        const slotArr = Int32Array.from(order, ([s, j]) => seqs[s].committed + j);
        const anc = new Uint32Array(n * words);
        order.forEach(([s, j], i) => {
          for (let a = j; a >= 0; a = seqs[s].parents[a]) anc[i * words + (a >> 5)] |= 1 << (a & 31);
        });
        const committed = Int32Array.from(seqs, (s) => s.committed);
        const kNew = randF32(n * row);
        const vNew = randF32(n * row);
        const kNewStored = encode(kvDtype, kNew, row);
        const vNewStored = encode(kvDtype, vNew, row);
        const q = randF32(n * nHeads * headDim);
        const offsetOf = (s: number, slot: number) =>
          (tables[s * maxBlocks + Math.floor(slot / blockSize)] * blockSize + (slot % blockSize)) * row;

        // Each backend writes the batch K/V into its own copy of the planes.
        const planes = (be: CpuBackend) => {
          const kp = dev(kStored.bytes);
          const vp = dev(vStored.bytes);
          be.kvWrite(dev(kNew), dev(vNew), n, row, dev(seqArr), dev(slotArr), dev(tables), maxBlocks, blockSize, kp, vp, kvDtype);
          return [kp, vp];
        };
        const [ks, vs] = planes(simd);
        const [kr, vr] = planes(ref);

        // After kvWrite: each written slot holds its batch row rounded to the cache dtype
        // (encode: Float16Array's round-to-nearest-even), every other byte is unchanged.
        for (const [name, before, batch, ps, pr] of [
          ["K", kStored.bytes, kNewStored.bytes, ks, kr],
          ["V", vStored.bytes, vNewStored.bytes, vs, vr],
        ] as const) {
          const want = before.slice();
          order.forEach(([s, j], i) => {
            const o = offsetOf(s, seqs[s].committed + j) * elem;
            want.set(batch.subarray(i * row * elem, (i + 1) * row * elem), o);
          });
          expectBytes(`${kvName} ${name} plane after kvWrite (SIMD)`, bytesAt(ps, want.length), want);
          expectBytes(`${kvName} ${name} plane after kvWrite (reference)`, bytesAt(pr, want.length), want);
        }

        const tp = dev(tables);
        const sp = dev(seqArr);
        const cp = dev(committed);
        const ap = dev(anc);
        const qp = dev(q);
        const scale = 1 / Math.sqrt(headDim);
        const os = zeros(n * nHeads * headDim * 4);
        const or = zeros(n * nHeads * headDim * 4);
        simd.attention(qp, n, nHeads, nKv, headDim, ks, vs, kvDtype, tp, maxBlocks, blockSize, sp, cp, ap, words, scale, os.ptr);
        ref.attention(qp, n, nHeads, nKv, headDim, kr, vr, kvDtype, tp, maxBlocks, blockSize, sp, cp, ap, words, scale, or.ptr);

        /** float64 attention over K/V rows from `rowOf`; pv = sum_j p_j |v_j| per output,
         *  qk = max_j sum_e |q_e k_je| and qa = sum_e |q_e| per (token, head). */
        const attend = (rowOf: (plane: "k" | "v", s: number, slot: number) => ArrayLike<number>) => {
          const out = new Float64Array(n * nHeads * headDim);
          const pv = new Float64Array(n * nHeads * headDim);
          const qk = new Float64Array(n * nHeads);
          const qa = new Float64Array(n * nHeads);
          order.forEach(([s, j], i) => {
            const slots: number[] = [];
            for (let t = 0; t < seqs[s].committed; t++) slots.push(t);
            for (let a = 0; a <= j; a++) if (anc[i * words + (a >> 5)] & (1 << (a & 31))) slots.push(seqs[s].committed + a);
            for (let h = 0; h < nHeads; h++) {
              const kh = Math.floor(h / (nHeads / nKv)) * headDim;
              const qo = (i * nHeads + h) * headDim;
              for (let e = 0; e < headDim; e++) qa[i * nHeads + h] += Math.abs(q[qo + e]);
              const sc = slots.map((slot) => {
                const k = rowOf("k", s, slot);
                let d = 0;
                let dAbs = 0;
                for (let e = 0; e < headDim; e++) {
                  d += q[qo + e] * k[kh + e];
                  dAbs += Math.abs(q[qo + e] * k[kh + e]);
                }
                qk[i * nHeads + h] = Math.max(qk[i * nHeads + h], dAbs);
                return d * scale;
              });
              const mx = Math.max(...sc);
              const p = sc.map((v) => Math.exp(v - mx));
              const sum = p.reduce((a, b) => a + b, 0);
              slots.forEach((slot, si) => {
                const v = rowOf("v", s, slot);
                for (let e = 0; e < headDim; e++) {
                  out[qo + e] += (p[si] / sum) * v[kh + e];
                  pv[qo + e] += (p[si] / sum) * Math.abs(v[kh + e]);
                }
              });
            }
          });
          return { out, pv, qk, qa };
        };
        /** Committed slots from the planes, batch slots from the batch rows. */
        const rowsFrom = (planeK: ArrayLike<number>, planeV: ArrayLike<number>, batchK: ArrayLike<number>, batchV: ArrayLike<number>) =>
          (plane: "k" | "v", s: number, slot: number): ArrayLike<number> => {
            const j = slot - seqs[s].committed;
            const [pl, batch] = plane === "k" ? [planeK, batchK] : [planeV, batchV];
            if (j >= 0) {
              const i = order.findIndex(([ss, jj]) => ss === s && jj === j);
              return Array.prototype.slice.call(batch, i * row, (i + 1) * row);
            }
            const o = offsetOf(s, slot);
            return Array.prototype.slice.call(pl, o, o + row);
          };

        // 1. Against the values the cache holds: only f32 arithmetic differs.
        const stored = attend(rowsFrom(kStored.values, vStored.values, kNewStored.values, vNewStored.values));
        const label = `attention ${kvName} hd=${headDim}`;
        expectClose(`${label} SIMD vs ref`, f32Of(os), f32Of(or), 1e-5, 1e-6);
        expectClose(`${label} vs f64 of the stored K/V`, f32Of(os), stored.out, 1e-5, 1e-6);

        // 2. Against the unrounded K/V, within the bound of rounding them: with every score
        // moved by at most D = scale * (u * qk + eta * qa), each p_j moves by a factor within
        // e^(+-2D), and each v by u|v| + eta, so
        //   |out - out_exact| <= (e^(2D) - 1) * sum_j p_j ((1 + u)|v_j| + eta) + sum_j p_j (u|v_j| + eta).
        const exact = attend(rowsFrom(kPlane, vPlane, kNew, vNew));
        const got = f32Of(os);
        for (let t = 0; t < n * nHeads; t++) {
          const D = scale * (u * exact.qk[t] + eta * exact.qa[t]);
          for (let e = 0; e < headDim; e++) {
            const x = t * headDim + e;
            const pv = exact.pv[x];
            const bound = (Math.exp(2 * D) - 1) * ((1 + u) * pv + eta) + u * pv + eta;
            const tol = bound + 1e-5 * pv + 1e-6; // plus the f32 arithmetic of check 1
            const d = Math.abs(got[x] - exact.out[x]);
            if (!(d <= tol)) {
              throw new Error(`${label} vs unrounded f64: index ${x}: got ${got[x]}, want ${exact.out[x]} (|diff| ${d} > ${tol}); SEED=${SEED}`);
            }
          }
        }
      });
    }

    test(`${kvName} cache: kvMove: SIMD == reference == moved bytes over all planes`, () => {
      const row = 24;
      const blockSize = 4;
      const poolBlocks = 12;
      const nPlanes = 3;
      // Planes need not be packed; an odd f16 stride leaves planes only 2-byte aligned.
      const planeStride = poolBlocks * blockSize * row + 41;
      const table = Int32Array.from([7, 2, 10, 0, 5, 11, 1]);
      const cache = encode(kvDtype, randF32(nPlanes * planeStride), 1).bytes;
      const c = 6;
      const src = Int32Array.from([c, c + 2, c + 5, c + 6, c + 9]);
      const dst = Int32Array.from([c, c + 1, c + 2, c + 3, c + 4]);
      const cs = dev(cache);
      const cr = dev(cache);
      const tp = dev(table);
      const spp = dev(src);
      const dp = dev(dst);
      simd.kvMove(cs, kvDtype, nPlanes, planeStride, row, tp, blockSize, spp, dp, src.length);
      ref.kvMove(cr, kvDtype, nPlanes, planeStride, row, tp, blockSize, spp, dp, src.length);
      const want = cache.slice();
      const off = (slot: number) => (table[Math.floor(slot / blockSize)] * blockSize + (slot % blockSize)) * row;
      for (let p = 0; p < nPlanes; p++) {
        for (let i = 0; i < src.length; i++) {
          const from = (p * planeStride + off(src[i])) * elem;
          want.copyWithin((p * planeStride + off(dst[i])) * elem, from, from + row * elem);
        }
      }
      expectBytes(`kvMove ${kvName} SIMD`, bytesAt(cs, want.length), want);
      expectBytes(`kvMove ${kvName} ref`, bytesAt(cr, want.length), want);
    });
  }

  test("F16 cache: kvWrite rounds to nearest even (ties, subnormals, overflow to inf, -0), SIMD and reference alike", () => {
    // The oracle: Float16Array rounds to nearest, ties to even (IEEE 754 binary16).
    expect(f16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie between 1 and 1 + 2^-10: even is 1
    expect(f16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie: even is 1 + 2^-9
    expect(f16Bits(65520)).toBe(0x7c00); // halfway to the next binade rounds to inf
    const edges = [
      1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -11 + 2 ** -20, 65504, 65519.99, 65520, -65520, 1e6,
      2 ** -25, 3 * 2 ** -25, 2 ** -24, 2 ** -14, 2 ** -14 - 2 ** -25, -0, 0, 0.1, 1 / 3, -2.5e-6,
    ].map(Math.fround);
    // 40 = two 16-lane vectors and an 8-element tail; the edge values land in both.
    const row = 40;
    const n = 3;
    const k = randF32(n * row, 4);
    const v = randF32(n * row, 4);
    const at = shuffle(Array.from({ length: n * row }, (_, i) => i)).slice(0, 2 * edges.length);
    edges.forEach((x, i) => {
      k[at[i]] = x;
      v[at[edges.length + i]] = -x;
    });
    const blockSize = 2;
    const table = Int32Array.from([3, 0, 2]);
    const slots = Int32Array.from([0, 5, 2]);
    const planeBytes = 4 * blockSize * row * 2;
    for (const be of [simd, ref]) {
      const kp = zeros(planeBytes);
      const vp = zeros(planeBytes);
      be.kvWrite(dev(k), dev(v), n, row, dev(new Int32Array(n)), dev(slots), dev(table), 3, blockSize, kp.ptr, vp.ptr, DType.F16);
      for (const [name, src, plane] of [["K", k, kp], ["V", v, vp]] as const) {
        const got = new Uint16Array(plane.host!);
        for (let i = 0; i < n; i++) {
          const o = (table[Math.floor(slots[i] / blockSize)] * blockSize + (slots[i] % blockSize)) * row;
          for (let e = 0; e < row; e++) {
            const want = f16Bits(src[i * row + e]);
            if (got[o + e] !== want) {
              throw new Error(`${be === simd ? "SIMD" : "reference"} ${name}: ${src[i * row + e]} stored as 0x${got[o + e].toString(16)}, want 0x${want.toString(16)}; SEED=${SEED}`);
            }
          }
        }
      }
    }
  });
});

// ---- memory, files, bandwidth --------------------------------------------------------------

describe("ALiBi tree attention", () => {
  for (const kvDtype of [DType.F32, DType.F16] as KVDType[]) {
    test(`${DTYPE_NAMES[kvDtype]} cache, MQA and GQA: bias -slope * (query position - key position) over committed slots and tree ancestors == float64`, () => {
      for (const [nHeads, nKv, headDim] of [[4, 1, 32], [8, 2, 40]]) {
        const row = nKv * headDim;
        const blockSize = 4;
        const maxBlocks = 24;
        const committed = 37;
        // A 40-node tree (W = 2): node j's parent is an earlier node; position = committed + depth.
        const parents = Array.from({ length: 40 }, (_, j) => (j === 0 ? -1 : randInt(j)));
        const depth = parents.map(() => 0);
        parents.forEach((p, j) => (depth[j] = p < 0 ? 0 : depth[p] + 1));
        const words = 2;
        const tables = Int32Array.from(shuffle(Array.from({ length: maxBlocks }, (_, i) => i)));
        const k = encode(kvDtype, randF32(maxBlocks * blockSize * row), row);
        const v = encode(kvDtype, randF32(maxBlocks * blockSize * row), row);
        const n = parents.length;
        const anc = new Uint32Array(n * words);
        for (let j = 0; j < n; j++) for (let a = j; a >= 0; a = parents[a]) anc[j * words + (a >> 5)] |= 1 << (a & 31);
        const q = randF32(n * nHeads * headDim, 2);
        const slopes = Float32Array.from({ length: nHeads }, (_, h) => 2 ** (-(8 * (h + 1)) / nHeads));
        const scale = 1 / Math.sqrt(headDim);
        const args = [dev(tables), maxBlocks, blockSize, dev(new Int32Array(n)), dev(Int32Array.from([committed])), dev(anc), words, scale] as const;
        const os = zeros(n * nHeads * headDim * 4);
        const or = zeros(n * nHeads * headDim * 4);
        const kp = dev(k.bytes);
        const vp = dev(v.bytes);
        const sp = dev(slopes);
        simd.attention(dev(q), n, nHeads, nKv, headDim, kp, vp, kvDtype, ...args, os.ptr, sp);
        ref.attention(dev(q), n, nHeads, nKv, headDim, kp, vp, kvDtype, ...args, or.ptr, sp);

        const want = new Float64Array(n * nHeads * headDim);
        const offsetOf = (slot: number) => (tables[Math.floor(slot / blockSize)] * blockSize + (slot % blockSize)) * row;
        for (let j = 0; j < n; j++) {
          const keys: { slot: number; pos: number }[] = [];
          for (let t = 0; t < committed; t++) keys.push({ slot: t, pos: t });
          for (let a = j; a >= 0; a = parents[a]) keys.push({ slot: committed + a, pos: committed + depth[a] });
          for (let h = 0; h < nHeads; h++) {
            const kh = Math.floor(h / (nHeads / nKv)) * headDim;
            const qo = (j * nHeads + h) * headDim;
            const sc = keys.map(({ slot, pos }) => {
              let d = 0;
              for (let e = 0; e < headDim; e++) d += q[qo + e] * k.values[offsetOf(slot) + kh + e];
              return d * scale - slopes[h] * (committed + depth[j] - pos);
            });
            const mx = Math.max(...sc);
            const p = sc.map((x) => Math.exp(x - mx));
            const sum = p.reduce((x, y) => x + y, 0);
            keys.forEach(({ slot }, ki) => {
              for (let e = 0; e < headDim; e++) want[qo + e] += (p[ki] / sum) * v.values[offsetOf(slot) + kh + e];
            });
          }
        }
        const label = `ALiBi attention ${DTYPE_NAMES[kvDtype]} heads=${nHeads}/${nKv}`;
        expectClose(`${label} SIMD vs ref`, f32Of(os), f32Of(or), 1e-5, 1e-6);
        expectClose(`${label} vs f64`, f32Of(os), want, 1e-5, 1e-6);
        expectClose(`${label} ref vs f64`, f32Of(or), want, 1e-5, 1e-6);
      }
    });
  }
});

test("alloc is 64-byte aligned and zeroed; upload/download round-trip", () => {
  for (const bytes of [1, 100, 4096, 1 << 20]) {
    const b = simd.alloc(bytes);
    expect(b.ptr % 64).toBe(0);
    expect(new Uint8Array(b.host!).every((v) => v === 0)).toBe(true);
    const src = Uint8Array.from({ length: bytes }, () => randInt(256));
    simd.upload(b.ptr, src);
    const back = new Uint8Array(bytes);
    simd.download(back, b.ptr);
    expect(back).toEqual(src);
    simd.free(b);
  }
  expect(() => simd.free({ ptr: 64 * 12345, bytes: 1, host: null })).toThrow(BackendError);
});

test("mapFile maps a file read-only; weights() addresses it without a copy", () => {
  const dir = mkdtempSync(join(tmpdir(), "specinfer-"));
  try {
    const path = join(dir, "w.bin");
    const data = randF32(1000);
    writeFileSync(path, data);
    const f = simd.mapFile(path, true);
    expect(f.size).toBe(4000);
    expect(new Float32Array(f.bytes.buffer, f.bytes.byteOffset, 1000)).toEqual(data);
    // Use the mapping directly as a matmul weight (F32, 10 rows of 100).
    const x = randF32(100);
    const y = zeros(10 * 4);
    simd.matmul(dev(x), 1, 100, simd.weights(f, 0, 4000), DType.F32, 10, 0, y.ptr);
    for (let r = 0; r < 10; r++) {
      let acc = 0;
      for (let i = 0; i < 100; i++) acc += data[r * 100 + i] * x[i];
      expect(Math.abs(f32Of(y)[r] - acc)).toBeLessThan(1e-4);
    }
    expect(simd.weights(f, 400, 4)).toBe(f.ptr + 400);
    expect(() => simd.weights(f, 3000, 2000)).toThrow(/outside/);
    f.close();
    f.close(); // idempotent
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test("mapFile errors name the path and the reason", () => {
  const dir = mkdtempSync(join(tmpdir(), "specinfer-"));
  try {
    const missing = join(dir, "nope.safetensors");
    expect(() => simd.mapFile(missing)).toThrow(BackendError);
    expect(() => simd.mapFile(missing)).toThrow(new RegExp(`${missing}.*no such file`));
    const empty = join(dir, "empty.gguf");
    writeFileSync(empty, "");
    expect(() => simd.mapFile(empty)).toThrow(new RegExp(`${empty}.*file is empty`));
    expect(() => simd.mapFile(dir)).toThrow(/not a regular file/);
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test("probeBandwidth returns a positive GB/s", () => {
  const b = zeros(16 << 20);
  const gbps = simd.probeBandwidth(b.ptr, b.bytes, 2);
  expect(gbps).toBeGreaterThan(0.1);
  expect(() => simd.probeBandwidth(b.ptr, 100, 1)).toThrow(BackendError);
});

// ---- bad input: BackendError with the library's message, process survives ------------------

describe("bad input", () => {
  const x = dev(randF32(64 * 4));
  const w = dev(new Uint8Array(64 * 34));
  const y = zeros(64 * 64 * 4);
  for (const [name, be] of [["simd", simd], ["reference", ref]] as const) {
    test(`${name}: errors carry a message and the backend keeps working`, () => {
      const ids = dev(Int32Array.from([0, 3, 10]));
      expect(() => be.embedding(w, DType.F32, 10, 8, ids, 3, y.ptr)).toThrow(/id 10 at index 2 is outside \[0, 10\)/);
      expect(() => be.matmul(x, 1, 33, w, DType.Q8_0, 4, 0, y.ptr)).toThrow(
        /si_matmul: k=33 is not a multiple of 32 for dtype Q8_0/,
      );
      expect(() => be.matmul(x, 1, 48, w, DType.Q4_0, 4, 0, y.ptr)).toThrow(/multiple of 32 for dtype Q4_0/);
      expect(() => be.matmul(x, 1, 32, w, 7 as DType, 4, 0, y.ptr)).toThrow(/unknown dtype 7/);
      expect(() => be.embedding(w, 99 as DType, 10, 8, ids, 1, y.ptr)).toThrow(/unknown dtype 99/);
      expect(() => be.matmul(x, -1, 32, w, DType.F32, 4, 0, y.ptr)).toThrow(/n=-1 must be >= 0/);
      expect(() => be.rmsnorm(x, x, -2, 8, 1e-5, y.ptr)).toThrow(/n=-2/);
      expect(() => be.add(x, x, -5)).toThrow(/count=-5/);
      expect(() => be.softmax(x, 1, 8, 0)).toThrow(/temperature/);
      expect(() => be.rope(x, 1, 1, 8, 6 + 1, x, x, RopeLayout.Half)).toThrow(/rot_dim=7/);
      expect(() => be.matmul(x, 1, 32, w, DType.F32, 4, 0, x)).toThrow(/overlap/);
      try {
        be.matmul(x, 1, 32, w, 7 as DType, 4, 0, y.ptr);
      } catch (e) {
        expect(e).toBeInstanceOf(BackendError);
        expect((e as Error).message).toContain("matmul failed (code 1)");
      }
      // Still alive and correct after the errors.
      be.matmul(x, 1, 32, w, DType.Q8_0, 4, 0, y.ptr);
      expect(Array.from(f32Of(y, 4))).toEqual([0, 0, 0, 0]);
    });
  }

  test("attention refuses slots outside the block table", () => {
    const one = dev(Int32Array.from([0]));
    const committed = dev(Int32Array.from([9]));
    const table = dev(Int32Array.from([0, 1]));
    const anc = dev(Uint32Array.from([1]));
    const q = dev(randF32(8));
    expect(() =>
      simd.attention(q, 1, 1, 1, 8, y.ptr, y.ptr, DType.F32, table, 2, 4, one, committed, anc, 1, 1, zeros(32).ptr),
    ).toThrow(/beyond max_blocks\*block_size=8/);
  });

  for (const [name, be] of [["simd", simd], ["reference", ref]] as const) {
    test(`${name}: a KV cache dtype other than F32/F16, or a misaligned plane, is refused with a BackendError naming it`, () => {
      const one = dev(Int32Array.from([0]));
      const table = dev(Int32Array.from([0, 1]));
      const plane = zeros(2 * 4 * 8 * 4).ptr;
      const kv = dev(randF32(8));
      const write = (dtype: DType, p = plane) => be.kvWrite(kv, kv, 1, 8, one, one, table, 2, 4, p, p, dtype as KVDType);
      const attend = (dtype: DType, p = plane) =>
        be.attention(kv, 1, 1, 1, 8, p, p, dtype as KVDType, table, 2, 4, one, one, dev(Uint32Array.from([1])), 1, 1, zeros(32).ptr);
      const move = (dtype: DType, p = plane) => be.kvMove(p, dtype as KVDType, 2, 64, 8, table, 4, one, one, 1);
      expect(() => write(DType.Q8_0)).toThrow(BackendError);
      expect(() => write(DType.Q8_0)).toThrow(/kvWrite failed \(code 1\): si_kv_write: kv_dtype=8 \(Q8_0\) is not a KV cache dtype \(expected F32=0 or F16=1\)/);
      expect(() => attend(DType.BF16)).toThrow(/si_attention: kv_dtype=30 \(BF16\) is not a KV cache dtype/);
      expect(() => move(7 as DType)).toThrow(/si_kv_move: kv_dtype=7 \(unknown\) is not a KV cache dtype/);
      expect(() => write(DType.F32, plane + 2)).toThrow(/si_kv_write: k_plane=0x[0-9a-f]+ is not 4-byte aligned/);
      expect(() => attend(DType.F16, plane + 1)).toThrow(/si_attention: k_plane=0x[0-9a-f]+ is not 2-byte aligned/);
      expect(() => move(DType.F16, plane + 1)).toThrow(/si_kv_move: cache=0x[0-9a-f]+ is not 2-byte aligned/);
      // Nothing was written, and the backend still works with both dtypes.
      expect(bytesAt(plane, 2 * 4 * 8 * 4).every((b) => b === 0)).toBe(true);
      const kvValues = new Float32Array(bytesAt(kv, 32).buffer);
      write(DType.F32);
      expect(new Float32Array(bytesAt(plane, 32).buffer)).toEqual(kvValues);
      write(DType.F16);
      expect(Array.from(new Uint16Array(bytesAt(plane, 16).buffer))).toEqual(Array.from(kvValues, f16Bits));
      attend(DType.F16);
      move(DType.F16);
    });
  }

  test("a closed backend throws instead of crashing", () => {
    const be = CpuBackend.create({ threads: 2 });
    be.close();
    be.close();
    expect(() => be.alloc(8)).toThrow(/closed/);
  });
});

// GGML's tensor encodings (F32, F16, BF16, Q8_0, Q4_0) for writing model files and for
// reading weights back in TypeScript, away from the native backend. The quantizers follow
// ggml's reference ones (quantize_row_q8_0_ref, quantize_row_q4_0_ref), which are what
// llama-quantize runs, so they give llama.cpp's bytes.

import { DType, DTYPE_NAMES } from "../backend/backend.ts";

/** The dtypes the writers encode, by their GGUF / safetensors names. */
export const GGML_TYPE = { F32: DType.F32, F16: DType.F16, BF16: DType.BF16, Q8_0: DType.Q8_0, Q4_0: DType.Q4_0 } as const;
export type WriteDType = keyof typeof GGML_TYPE;

/** Values per Q8_0 / Q4_0 block. */
export const QUANT_BLOCK = 32;

// Float16Array converts with round-to-nearest-even, as F16C and ggml's fp32_to_fp16 do.
const f16Scratch = new Float16Array(1);
const f16ScratchBits = new Uint16Array(f16Scratch.buffer);
const f32Scratch = new Float32Array(1);
const f32ScratchBits = new Uint32Array(f32Scratch.buffer);

/** IEEE half bits of `x` taken as an f32 (as C passes it), round to nearest even. */
export function f32ToF16Bits(x: number): number {
  f16Scratch[0] = Math.fround(x);
  return f16ScratchBits[0]!;
}

export function f16BitsToF32(h: number): number {
  f16ScratchBits[0] = h;
  return f16Scratch[0]!;
}

/** bfloat16 bits of `x`, round to nearest even, NaN kept quiet: ggml's fp32_to_bf16. */
export function f32ToBF16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = f32ScratchBits[0]!;
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** `values` in `dtype`'s bytes; F32 is a view of `values`, not a copy. */
export function encodeTensor(dtype: WriteDType, values: Float32Array): Uint8Array {
  switch (dtype) {
    case "F32":
      return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
    case "F16":
      return new Uint8Array(new Float16Array(values).buffer);
    case "BF16":
      return new Uint8Array(Uint16Array.from(values, f32ToBF16Bits).buffer);
    case "Q8_0":
      return encodeQ8_0(values);
    case "Q4_0":
      return encodeQ4_0(values);
  }
}

function blockCount(dtype: string, count: number): number {
  if (count % QUANT_BLOCK !== 0) throw new Error(`${dtype} needs a multiple of ${QUANT_BLOCK} values, got ${count}`);
  return count / QUANT_BLOCK;
}

/** Per block of 32: d = amax / 127 stored as f16, q = roundf(x * (1/d)). */
export function encodeQ8_0(values: Float32Array): Uint8Array {
  const blocks = blockCount("Q8_0", values.length);
  const out = new Uint8Array(blocks * 34);
  const q = new Int8Array(out.buffer);
  const view = new DataView(out.buffer);
  for (let b = 0; b < blocks; b++) {
    const base = b * QUANT_BLOCK;
    let amax = 0;
    for (let j = 0; j < QUANT_BLOCK; j++) {
      const a = Math.abs(values[base + j]!);
      // ggml's MAX(amax, a) is amax > a ? amax : a; kept so that NaNs land the same way.
      amax = amax > a ? amax : a;
    }
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    view.setUint16(b * 34, f32ToF16Bits(d), true);
    for (let j = 0; j < QUANT_BLOCK; j++) {
      const x = Math.fround(values[base + j]! * id);
      // C's roundf: halves away from zero.
      q[b * 34 + 2 + j] = x < 0 ? -Math.floor(-x + 0.5) : Math.floor(x + 0.5);
    }
  }
  return out;
}

/** Per block of 32: d = (the signed value of largest magnitude) / -8 stored as f16,
 *  q = min(15, trunc(x * (1/d) + 8.5)); byte j holds q[j] | q[j + 16] << 4. */
function encodeQ4_0(values: Float32Array): Uint8Array {
  const blocks = blockCount("Q4_0", values.length);
  const out = new Uint8Array(blocks * 18);
  const view = new DataView(out.buffer);
  for (let b = 0; b < blocks; b++) {
    const base = b * QUANT_BLOCK;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < QUANT_BLOCK; j++) {
      const v = values[base + j]!;
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = Math.fround(max / -8);
    const id = d ? Math.fround(1 / d) : 0;
    view.setUint16(b * 18, f32ToF16Bits(d), true);
    const quant = (j: number) => Math.min(15, Math.trunc(Math.fround(Math.fround(values[base + j]! * id) + 8.5)));
    for (let j = 0; j < QUANT_BLOCK / 2; j++) out[b * 18 + 2 + j] = quant(j) | (quant(j + QUANT_BLOCK / 2) << 4);
  }
  return out;
}

/** Decodes `count` values of `dtype` from `bytes` (the layouts of ffi/specinfer.h). */
export function dequantize(dtype: DType, bytes: Uint8Array, count: number): Float32Array {
  // Copies: a file offset need not be aligned for the typed-array views.
  switch (dtype) {
    case DType.F32:
      return new Float32Array(bytes.slice(0, 4 * count).buffer);
    case DType.F16:
      return Float32Array.from(new Float16Array(bytes.slice(0, 2 * count).buffer));
    case DType.BF16: {
      const h = new Uint16Array(bytes.slice(0, 2 * count).buffer);
      const out = new Float32Array(count);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < count; i++) bits[i] = h[i]! << 16;
      return out;
    }
    case DType.Q8_0:
    case DType.Q4_0: {
      const blockBytes = dtype === DType.Q8_0 ? 34 : 18;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const out = new Float32Array(count);
      const blocks = blockCount(DTYPE_NAMES[dtype], count);
      for (let b = 0; b < blocks; b++) {
        const at = b * blockBytes;
        const d = f16BitsToF32(view.getUint16(at, true));
        for (let j = 0; j < QUANT_BLOCK; j++) {
          const q = dtype === DType.Q8_0 ? view.getInt8(at + 2 + j) : ((bytes[at + 2 + (j % 16)]! >> (j < 16 ? 0 : 4)) & 15) - 8;
          out[b * QUANT_BLOCK + j] = q * d;
        }
      }
      return out;
    }
  }
}

/** llama-arch GGUFs hold q/k rows in the order of adjacent-pair RoPE (llama.cpp's
 *  converters permute them): within each head of D rows, GGUF row 2i is HF row i and
 *  row 2i+1 is HF row i + D/2. Rows are independent (quant blocks run along them), so
 *  this takes float rows and encoded rows alike. */
export function permuteRowsForGGUF<T extends Float32Array | Uint8Array>(rows: T, heads: number, headDim: number): T {
  return reorderHeadRows(rows, heads, headDim, true);
}

/** Inverse of permuteRowsForGGUF. */
export function unpermuteRowsFromGGUF<T extends Float32Array | Uint8Array>(rows: T, heads: number, headDim: number): T {
  return reorderHeadRows(rows, heads, headDim, false);
}

function reorderHeadRows<T extends Float32Array | Uint8Array>(rows: T, heads: number, headDim: number, toGGUF: boolean): T {
  const rowLen = rows.length / (heads * headDim);
  const out = rows.slice() as T;
  const move = (from: number, to: number) => out.set(rows.subarray(from * rowLen, (from + 1) * rowLen), to * rowLen);
  const half = headDim / 2;
  for (let h = 0; h < heads; h++) {
    const base = h * headDim;
    for (let i = 0; i < half; i++) {
      for (const [hfRow, ggufRow] of [[base + i, base + 2 * i], [base + half + i, base + 2 * i + 1]] as const) {
        if (toGGUF) move(hfRow, ggufRow);
        else move(ggufRow, hfRow);
      }
    }
  }
  return out;
}

// The Backend interface: tensors live in native ("device") memory and are named by
// address; every op is one native call over addresses and shapes (ffi/specinfer.h).
// Layers above this file never see bun:ffi.

/** Element types; the values are GGML's type ids (ffi/specinfer.h `si_dtype`). */
export enum DType {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q8_0 = 8,
  BF16 = 30,
}

export const DTYPE_NAMES: Record<DType, string> = {
  [DType.F32]: "F32",
  [DType.F16]: "F16",
  [DType.Q4_0]: "Q4_0",
  [DType.Q8_0]: "Q8_0",
  [DType.BF16]: "BF16",
};

/** Element types a KV cache plane may hold (ffi/specinfer.h: K/V rounded to f16 on
 *  write, read back as f32). */
export type KVDType = DType.F32 | DType.F16;

/** Bytes taken by `count` elements of `dtype` (count must fill whole blocks). */
export function dtypeBytes(dtype: DType, count: number): number {
  switch (dtype) {
    case DType.F32:
      return count * 4;
    case DType.F16:
    case DType.BF16:
      return count * 2;
    case DType.Q8_0:
      return (count / 32) * 34;
    case DType.Q4_0:
      return (count / 32) * 18;
  }
}

export enum RopeLayout {
  /** HF rotate_half: dim i pairs with dim i + rotDim/2. */
  Half = 0,
  /** GGUF / Meta: dim 2i pairs with dim 2i+1. */
  Interleaved = 1,
}

/** si_activation kinds (ffi/specinfer.h). */
export enum Activation {
  ReLU = 0,
  /** Exact (erf) GELU. */
  GELU = 1,
  /** GELU's tanh approximation (gelu_new, gelu_pytorch_tanh). */
  GELUTanh = 2,
}

/** A device address (host memory on the CPU backend). */
export type Ptr = number;

/** A read-only file mapping: `bytes` views it from JS, `ptr` is its host address. */
export interface MappedFile {
  readonly path: string;
  readonly size: number;
  readonly bytes: Uint8Array;
  readonly ptr: Ptr;
  close(): void;
}

/** Device memory owned by the backend. `host` is a JS view on CPU; null on CUDA. */
export interface DeviceBuffer {
  readonly ptr: Ptr;
  readonly bytes: number;
  readonly host: ArrayBuffer | null;
}

export interface Backend {
  readonly name: "cpu" | "cuda";
  readonly threads: number;

  alloc(bytes: number): DeviceBuffer;
  free(buf: DeviceBuffer): void;
  upload(dst: Ptr, src: ArrayBufferView): void;
  download(dst: ArrayBufferView, src: Ptr): void;
  sync(): void;

  mapFile(path: string, populate?: boolean): MappedFile;
  /** Device address of `bytes` bytes at `offset` of a mapped file: the mapping itself
   *  on the CPU (no copy), an uploaded copy on CUDA. */
  weights(file: MappedFile, offset: number, bytes: number): Ptr;

  embedding(table: Ptr, dtype: DType, vocab: number, dim: number, ids: Ptr, n: number, out: Ptr): void;
  matmul(x: Ptr, n: number, k: number, w: Ptr, dtype: DType, m: number, bias: Ptr, y: Ptr): void;
  rmsnorm(x: Ptr, weight: Ptr, n: number, dim: number, eps: number, y: Ptr): void;
  rope(
    x: Ptr, n: number, nHeads: number, headDim: number, rotDim: number,
    positions: Ptr, invFreq: Ptr, layout: RopeLayout,
  ): void;
  swiglu(gate: Ptr, up: Ptr, count: number, out: Ptr): void;
  add(x: Ptr, y: Ptr, count: number): void;
  /** LayerNorm of each row; `bias` 0 for none. y may equal x. */
  layernorm(x: Ptr, weight: Ptr, bias: Ptr, n: number, dim: number, eps: number, y: Ptr): void;
  activation(x: Ptr, count: number, kind: Activation, out: Ptr): void;
  /** In place: x clipped to [-limit, limit]. */
  clamp(x: Ptr, count: number, limit: number): void;
  /** x[i, :] += row ids[i] + offset of `table` (learned position embeddings). */
  addRows(x: Ptr, table: Ptr, dtype: DType, rows: number, dim: number, ids: Ptr, n: number, offset: number): void;
  /** Writes f32 K/V rows into planes of `kvDtype`. */
  kvWrite(
    k: Ptr, v: Ptr, n: number, row: number, seq: Ptr, slot: Ptr,
    blockTables: Ptr, maxBlocks: number, blockSize: number, kPlane: Ptr, vPlane: Ptr, kvDtype: KVDType,
  ): void;
  attention(
    q: Ptr, n: number, nHeads: number, nKvHeads: number, headDim: number,
    kPlane: Ptr, vPlane: Ptr, kvDtype: KVDType, blockTables: Ptr, maxBlocks: number, blockSize: number,
    seq: Ptr, committed: Ptr, ancestors: Ptr, words: number, scale: number, out: Ptr,
    /** Per query head ALiBi slopes (0 = no ALiBi). */
    alibiSlopes?: Ptr,
  ): void;
  /** `planeStride` counts elements of `kvDtype`, not bytes. */
  kvMove(
    cache: Ptr, kvDtype: KVDType, nPlanes: number, planeStride: number, row: number, table: Ptr,
    blockSize: number, src: Ptr, dst: Ptr, n: number,
  ): void;
  argmax(x: Ptr, rows: number, n: number, out: Ptr): void;
  softmax(x: Ptr, rows: number, n: number, temperature: number): void;
  probeBandwidth(buf: Ptr, bytes: number, reps: number): number;

  close(): void;
}

/** A native op failed; the message is the library's own (si_last_error). */
export class BackendError extends Error {
  constructor(op: string, code: number, detail: string) {
    super(`${op} failed (code ${code}): ${detail || "no detail"}`);
    this.name = "BackendError";
  }
}

// The Backend interface: tensors live in native ("device") memory and are named by
// address; every op is one native call over addresses and shapes (ffi/specinfer.h).
// Layers above this file never see bun:ffi.

import type { BackendOps } from "./abi.ts";

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

/** The ops (abi.ts's table) plus memory, files and lifetime. */
export interface Backend extends BackendOps {
  readonly name: "cpu" | "cuda";
  readonly threads: number;

  alloc(bytes: number): DeviceBuffer;
  free(buf: DeviceBuffer): void;
  upload(dst: Ptr, src: ArrayBufferView): void;
  download(dst: ArrayBufferView, src: Ptr): void;
  /** The device address of host memory `view` spans, where ops can read host memory
   *  (CPU); null where they cannot (CUDA). Use it at once, never keep it (TRAPS.md). */
  addressOf(view: ArrayBufferView): Ptr | null;

  mapFile(path: string, populate?: boolean): MappedFile;
  /** Device address of `bytes` bytes at `offset` of a mapped file: the mapping itself
   *  on the CPU (no copy), an uploaded copy on CUDA. */
  weights(file: MappedFile, offset: number, bytes: number): Ptr;

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

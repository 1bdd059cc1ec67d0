// The native ABI (ffi/specinfer.h) as one binding table shared by the CPU and CUDA
// backends: both libraries export exactly these symbols. This file does not import
// bun:ffi; the types are Bun's string names, and the backend that dlopens a library
// hands its `symbols` to NativeOps.
//
// Bun FFI rules followed here (TRAPS.md): every status is an i32 (no BigInt returns);
// pointers cross as numbers (native addresses), never as cached ptr() of JS memory.

import { type Activation, BackendError, type DType, type KVDType, type Ptr, type RopeLayout } from "./backend.ts";

export const SYMBOLS = {
  si_create: { args: ["i32", "i32"], returns: "ptr" },
  si_destroy: { args: ["ptr"], returns: "void" },
  si_last_error: { args: ["ptr"], returns: "cstring" },
  si_threads: { args: ["ptr"], returns: "i32" },
  si_sync: { args: ["ptr"], returns: "i32" },

  si_alloc: { args: ["ptr", "u64"], returns: "ptr" },
  si_free: { args: ["ptr", "ptr"], returns: "i32" },
  si_upload: { args: ["ptr", "ptr", "ptr", "u64"], returns: "i32" },
  si_download: { args: ["ptr", "ptr", "ptr", "u64"], returns: "i32" },
  si_map_file: { args: ["ptr", "ptr", "i32", "ptr"], returns: "ptr" },
  si_unmap_file: { args: ["ptr", "ptr", "u64"], returns: "i32" },

  si_embedding: { args: ["ptr", "ptr", "i32", "i32", "i32", "ptr", "i32", "ptr"], returns: "i32" },
  si_matmul: { args: ["ptr", "ptr", "i32", "i32", "ptr", "i32", "i32", "ptr", "ptr"], returns: "i32" },
  si_rmsnorm: { args: ["ptr", "ptr", "ptr", "i32", "i32", "f32", "ptr"], returns: "i32" },
  si_rope: { args: ["ptr", "ptr", "i32", "i32", "i32", "i32", "ptr", "ptr", "i32"], returns: "i32" },
  si_swiglu: { args: ["ptr", "ptr", "ptr", "i64", "ptr"], returns: "i32" },
  si_add: { args: ["ptr", "ptr", "ptr", "i64"], returns: "i32" },
  si_layernorm: { args: ["ptr", "ptr", "ptr", "ptr", "i32", "i32", "f32", "ptr"], returns: "i32" },
  si_activation: { args: ["ptr", "ptr", "i64", "i32", "ptr"], returns: "i32" },
  si_clamp: { args: ["ptr", "ptr", "i64", "f32"], returns: "i32" },
  si_add_rows: { args: ["ptr", "ptr", "ptr", "i32", "i32", "i32", "ptr", "i32", "i32"], returns: "i32" },
  si_kv_write: {
    args: ["ptr", "ptr", "ptr", "i32", "i32", "ptr", "ptr", "ptr", "i32", "i32", "ptr", "ptr", "i32"],
    returns: "i32",
  },
  si_attention: {
    args: [
      "ptr", "ptr", "i32", "i32", "i32", "i32", "ptr", "ptr", "i32", "ptr", "i32", "i32",
      "ptr", "ptr", "ptr", "i32", "f32", "ptr", "ptr",
    ],
    returns: "i32",
  },
  si_kv_move: { args: ["ptr", "ptr", "i32", "i32", "i64", "i32", "ptr", "i32", "ptr", "ptr", "i32"], returns: "i32" },
  si_argmax: { args: ["ptr", "ptr", "i32", "i32", "ptr"], returns: "i32" },
  si_softmax: { args: ["ptr", "ptr", "i32", "i32", "f32"], returns: "i32" },
  si_probe_bandwidth: { args: ["ptr", "ptr", "u64", "i32", "ptr"], returns: "i32" },
} as const;

type P = number | null; // a native address (null = NULL)
type Arg = P | ArrayBufferView; // TypedArray arguments are converted at call time

/** The dlopen'd functions, typed by hand so this file needs no bun:ffi import. */
export interface NativeSymbols {
  si_create(nThreads: number, flags: number): P;
  si_destroy(ctx: P): void;
  si_last_error(ctx: P): { toString(): string } | string;
  si_threads(ctx: P): number;
  si_sync(ctx: P): number;
  si_alloc(ctx: P, bytes: number): P;
  si_free(ctx: P, p: P): number;
  si_upload(ctx: P, dst: P, src: Arg, bytes: number): number;
  si_download(ctx: P, dst: Arg, src: P, bytes: number): number;
  si_map_file(ctx: P, path: Arg, populate: number, sizeOut: P): P;
  si_unmap_file(ctx: P, base: P, size: number): number;
  si_embedding(ctx: P, table: P, dtype: number, vocab: number, dim: number, ids: P, n: number, out: P): number;
  si_matmul(ctx: P, x: P, n: number, k: number, w: P, dtype: number, m: number, bias: P, y: P): number;
  si_rmsnorm(ctx: P, x: P, w: P, n: number, dim: number, eps: number, y: P): number;
  si_rope(ctx: P, x: P, n: number, nh: number, hd: number, rd: number, pos: P, invFreq: P, layout: number): number;
  si_swiglu(ctx: P, gate: P, up: P, count: number, out: P): number;
  si_add(ctx: P, x: P, y: P, count: number): number;
  si_layernorm(ctx: P, x: P, w: P, b: P, n: number, dim: number, eps: number, y: P): number;
  si_activation(ctx: P, x: P, count: number, kind: number, out: P): number;
  si_clamp(ctx: P, x: P, count: number, limit: number): number;
  si_add_rows(ctx: P, x: P, table: P, dtype: number, rows: number, dim: number, ids: P, n: number, offset: number): number;
  si_kv_write(
    ctx: P, k: P, v: P, n: number, row: number, seq: P, slot: P, bt: P, maxBlocks: number,
    blockSize: number, kPlane: P, vPlane: P, kvDtype: number,
  ): number;
  si_attention(
    ctx: P, q: P, n: number, nh: number, nkv: number, hd: number, kPlane: P, vPlane: P, kvDtype: number, bt: P,
    maxBlocks: number, blockSize: number, seq: P, committed: P, anc: P, words: number, scale: number, out: P,
    alibi: P,
  ): number;
  si_kv_move(
    ctx: P, cache: P, kvDtype: number, nPlanes: number, planeStride: number, row: number, table: P,
    blockSize: number, src: P, dst: P, n: number,
  ): number;
  si_argmax(ctx: P, x: P, rows: number, n: number, out: P): number;
  si_softmax(ctx: P, x: P, rows: number, n: number, temperature: number): number;
  si_probe_bandwidth(ctx: P, buf: P, bytes: number, reps: number, gbps: P): number;
}

export const SI_FLAG_REFERENCE = 1;

/** The ops of Backend as one native call each; memory management is the subclass's. */
export abstract class NativeOps {
  protected ctx: P;

  protected constructor(
    protected readonly lib: NativeSymbols,
    ctx: P,
  ) {
    this.ctx = ctx;
  }

  protected get live(): P {
    if (this.ctx === null) throw new BackendError("backend", -1, "the backend was closed");
    return this.ctx;
  }

  /** Throws BackendError with the library's message for a non-zero status. */
  protected check(op: string, rc: number): void {
    if (rc !== 0) throw new BackendError(op, rc, this.lastError());
  }

  protected lastError(): string {
    return this.ctx === null ? "the backend was closed" : String(this.lib.si_last_error(this.ctx));
  }

  sync(): void {
    this.check("sync", this.lib.si_sync(this.live));
  }

  embedding(table: Ptr, dtype: DType, vocab: number, dim: number, ids: Ptr, n: number, out: Ptr): void {
    this.check("embedding", this.lib.si_embedding(this.live, table, dtype, vocab, dim, ids, n, out));
  }

  matmul(x: Ptr, n: number, k: number, w: Ptr, dtype: DType, m: number, bias: Ptr, y: Ptr): void {
    this.check("matmul", this.lib.si_matmul(this.live, x, n, k, w, dtype, m, bias || null, y));
  }

  rmsnorm(x: Ptr, weight: Ptr, n: number, dim: number, eps: number, y: Ptr): void {
    this.check("rmsnorm", this.lib.si_rmsnorm(this.live, x, weight, n, dim, eps, y));
  }

  rope(
    x: Ptr, n: number, nHeads: number, headDim: number, rotDim: number,
    positions: Ptr, invFreq: Ptr, layout: RopeLayout,
  ): void {
    this.check("rope", this.lib.si_rope(this.live, x, n, nHeads, headDim, rotDim, positions, invFreq, layout));
  }

  swiglu(gate: Ptr, up: Ptr, count: number, out: Ptr): void {
    this.check("swiglu", this.lib.si_swiglu(this.live, gate, up, count, out));
  }

  add(x: Ptr, y: Ptr, count: number): void {
    this.check("add", this.lib.si_add(this.live, x, y, count));
  }

  layernorm(x: Ptr, weight: Ptr, bias: Ptr, n: number, dim: number, eps: number, y: Ptr): void {
    this.check("layernorm", this.lib.si_layernorm(this.live, x, weight, bias || null, n, dim, eps, y));
  }

  activation(x: Ptr, count: number, kind: Activation, out: Ptr): void {
    this.check("activation", this.lib.si_activation(this.live, x, count, kind, out));
  }

  clamp(x: Ptr, count: number, limit: number): void {
    this.check("clamp", this.lib.si_clamp(this.live, x, count, limit));
  }

  addRows(x: Ptr, table: Ptr, dtype: DType, rows: number, dim: number, ids: Ptr, n: number, offset: number): void {
    this.check("addRows", this.lib.si_add_rows(this.live, x, table, dtype, rows, dim, ids, n, offset));
  }

  kvWrite(
    k: Ptr, v: Ptr, n: number, row: number, seq: Ptr, slot: Ptr,
    blockTables: Ptr, maxBlocks: number, blockSize: number, kPlane: Ptr, vPlane: Ptr, kvDtype: KVDType,
  ): void {
    this.check(
      "kvWrite",
      this.lib.si_kv_write(this.live, k, v, n, row, seq, slot, blockTables, maxBlocks, blockSize, kPlane, vPlane, kvDtype),
    );
  }

  attention(
    q: Ptr, n: number, nHeads: number, nKvHeads: number, headDim: number,
    kPlane: Ptr, vPlane: Ptr, kvDtype: KVDType, blockTables: Ptr, maxBlocks: number, blockSize: number,
    seq: Ptr, committed: Ptr, ancestors: Ptr, words: number, scale: number, out: Ptr, alibiSlopes: Ptr = 0,
  ): void {
    this.check(
      "attention",
      this.lib.si_attention(
        this.live, q, n, nHeads, nKvHeads, headDim, kPlane, vPlane, kvDtype, blockTables, maxBlocks, blockSize,
        seq, committed, ancestors || null, words, scale, out, alibiSlopes || null,
      ),
    );
  }

  kvMove(
    cache: Ptr, kvDtype: KVDType, nPlanes: number, planeStride: number, row: number, table: Ptr,
    blockSize: number, src: Ptr, dst: Ptr, n: number,
  ): void {
    this.check(
      "kvMove",
      this.lib.si_kv_move(this.live, cache, kvDtype, nPlanes, planeStride, row, table, blockSize, src, dst, n),
    );
  }

  argmax(x: Ptr, rows: number, n: number, out: Ptr): void {
    this.check("argmax", this.lib.si_argmax(this.live, x, rows, n, out));
  }

  softmax(x: Ptr, rows: number, n: number, temperature: number): void {
    this.check("softmax", this.lib.si_softmax(this.live, x, rows, n, temperature));
  }
}

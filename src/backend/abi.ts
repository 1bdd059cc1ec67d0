// The native ABI (ffi/specinfer.h) as one table. Each op is written once, here: its
// symbol and its arguments after the context as "name:kind". From the table come the
// symbol list dlopen binds (SYMBOLS), the typed native functions (NativeSymbols), the
// Backend's op methods (BackendOps) and their one generic implementation (NativeOps).
// test/backend/abi.test.ts holds the table to the C header. This file does not import
// bun:ffi; types are Bun's FFI type names.
//
// Bun FFI rules followed here (TRAPS.md): every status is an i32 (no BigInt returns);
// pointers cross as numbers (native addresses), never as cached ptr() of JS memory.

import { type Activation, BackendError, type DType, type KVDType, type Ptr, type RopeLayout } from "./backend.ts";

/** Bun FFI type names used by the ABI. */
export type FFIName = "ptr" | "i32" | "i64" | "u64" | "f32" | "f64" | "void" | "cstring";

/** An op argument's kind: how it crosses the ABI and what TypeScript type it takes.
 *  "ptr?" may be 0 (passed as NULL) and, as the last argument, may be left out. */
interface KindTypes {
  ptr: Ptr;
  "ptr?": Ptr;
  i32: number;
  i64: number;
  f32: number;
  dtype: DType;
  kvdtype: KVDType;
  layout: RopeLayout;
  activation: Activation;
}
export type Kind = keyof KindTypes;

export const KIND_FFI: Record<Kind, FFIName> = {
  ptr: "ptr",
  "ptr?": "ptr",
  i32: "i32",
  i64: "i64",
  f32: "f32",
  dtype: "i32",
  kvdtype: "i32",
  layout: "i32",
  activation: "i32",
};

/** One argument: "name:kind" (the name documents; the kind types it). */
type ArgSpec = `${string}:${Kind}`;

export interface OpSpec {
  symbol: `si_${string}`;
  args: readonly ArgSpec[];
}

/** Every op: `(ctx, ...args) -> int32 status`. Keys are the Backend method names. */
export const OPS = {
  sync: { symbol: "si_sync", args: [] },
  embedding: {
    symbol: "si_embedding",
    args: ["table:ptr", "dtype:dtype", "vocab:i32", "dim:i32", "ids:ptr", "n:i32", "out:ptr"],
  },
  matmul: {
    symbol: "si_matmul",
    args: ["x:ptr", "n:i32", "k:i32", "w:ptr", "dtype:dtype", "m:i32", "bias:ptr?", "y:ptr"],
  },
  rmsnorm: { symbol: "si_rmsnorm", args: ["x:ptr", "weight:ptr", "n:i32", "dim:i32", "eps:f32", "y:ptr"] },
  rope: {
    symbol: "si_rope",
    args: ["x:ptr", "n:i32", "nHeads:i32", "headDim:i32", "rotDim:i32", "positions:ptr", "invFreq:ptr", "layout:layout"],
  },
  swiglu: { symbol: "si_swiglu", args: ["gate:ptr", "up:ptr", "count:i64", "out:ptr"] },
  add: { symbol: "si_add", args: ["x:ptr", "y:ptr", "count:i64"] },
  /** LayerNorm of each row; bias 0 for none. y may equal x. */
  layernorm: {
    symbol: "si_layernorm",
    args: ["x:ptr", "weight:ptr", "bias:ptr?", "n:i32", "dim:i32", "eps:f32", "y:ptr"],
  },
  activation: { symbol: "si_activation", args: ["x:ptr", "count:i64", "kind:activation", "out:ptr"] },
  /** In place: x clipped to [-limit, limit]. */
  clamp: { symbol: "si_clamp", args: ["x:ptr", "count:i64", "limit:f32"] },
  /** x[i, :] += row ids[i] + offset of `table` (learned position embeddings). */
  addRows: {
    symbol: "si_add_rows",
    args: ["x:ptr", "table:ptr", "dtype:dtype", "rows:i32", "dim:i32", "ids:ptr", "n:i32", "offset:i32"],
  },
  /** Writes f32 K/V rows into planes of `kvDtype`. */
  kvWrite: {
    symbol: "si_kv_write",
    args: [
      "k:ptr", "v:ptr", "n:i32", "row:i32", "seq:ptr", "slot:ptr", "blockTables:ptr", "maxBlocks:i32",
      "blockSize:i32", "kPlane:ptr", "vPlane:ptr", "kvDtype:kvdtype",
    ],
  },
  /** Tree attention over the paged cache; alibiSlopes per query head (0 or absent = none). */
  attention: {
    symbol: "si_attention",
    args: [
      "q:ptr", "n:i32", "nHeads:i32", "nKvHeads:i32", "headDim:i32", "kPlane:ptr", "vPlane:ptr", "kvDtype:kvdtype",
      "blockTables:ptr", "maxBlocks:i32", "blockSize:i32", "seq:ptr", "committed:ptr", "ancestors:ptr?",
      "words:i32", "scale:f32", "out:ptr", "alibiSlopes:ptr?",
    ],
  },
  /** `planeStride` counts elements of `kvDtype`, not bytes. */
  kvMove: {
    symbol: "si_kv_move",
    args: [
      "cache:ptr", "kvDtype:kvdtype", "nPlanes:i32", "planeStride:i64", "row:i32", "table:ptr", "blockSize:i32",
      "src:ptr", "dst:ptr", "n:i32",
    ],
  },
  argmax: { symbol: "si_argmax", args: ["x:ptr", "rows:i32", "n:i32", "out:ptr"] },
  softmax: { symbol: "si_softmax", args: ["x:ptr", "rows:i32", "n:i32", "temperature:f32"] },
  /** Per row of logits: penalties and bias from the row's token list, then greedy argmax
   *  or the seeded draw; out[row] = token (-1: no mass), probs = sampled rows' distributions. */
  sample: {
    symbol: "si_sample",
    args: [
      "logits:ptr", "rows:i32", "vocab:i32", "params:ptr", "listStart:ptr", "listToken:ptr?", "listCount:ptr?",
      "listBias:ptr?", "probs:ptr", "out:ptr",
    ],
  },
  /** Greedy walk of token trees against the tokens si_sample picked per row. */
  treeAccept: {
    symbol: "si_tree_accept",
    args: ["trees:i32", "treeStart:ptr", "parents:ptr", "tokens:ptr", "picked:ptr", "accepted:ptr", "counts:ptr", "bonus:ptr"],
  },
  /** CUDA graph regions (cuda/graph.cu; no-ops on the CPU): begin(key >= 0), end(run:
   *  1 runs what the region holds, 0 drops it unrun), drop(key; -1 = every graph). */
  graphBegin: { symbol: "si_graph_begin", args: ["key:i32"] },
  graphEnd: { symbol: "si_graph_end", args: ["run:i32"] },
  graphDrop: { symbol: "si_graph_drop", args: ["key:i32"] },
} as const satisfies Record<string, OpSpec>;

export type OpName = keyof typeof OPS;

/** The functions around the ops (context, memory, files, diagnostics): used by hand in
 *  native.ts, since they return pointers or strings or take host memory. */
export const LIBRARY = {
  si_create: { args: ["i32", "i32"], returns: "ptr" },
  si_destroy: { args: ["ptr"], returns: "void" },
  si_last_error: { args: ["ptr"], returns: "cstring" },
  si_threads: { args: ["ptr"], returns: "i32" },
  si_alloc: { args: ["ptr", "u64"], returns: "ptr" },
  si_free: { args: ["ptr", "ptr"], returns: "i32" },
  si_upload: { args: ["ptr", "ptr", "ptr", "u64"], returns: "i32" },
  si_download: { args: ["ptr", "ptr", "ptr", "u64"], returns: "i32" },
  si_map_file: { args: ["ptr", "ptr", "i32", "ptr"], returns: "ptr" },
  si_unmap_file: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  si_probe_bandwidth: { args: ["ptr", "ptr", "u64", "i32", "ptr"], returns: "i32" },
} as const satisfies Record<string, { args: readonly FFIName[]; returns: FFIName }>;

// ---- types derived from the tables ------------------------------------------------

type KindOf<A> = A extends `${string}:${infer K extends Kind}` ? K : never;

/** An op's parameters: one per argument, in order; a trailing "ptr?" is optional. */
type OpParams<A extends readonly unknown[]> = A extends readonly [infer H, ...infer T]
  ? T extends readonly []
    ? KindOf<H> extends "ptr?" ? [last?: Ptr] : [last: KindTypes[KindOf<H>]]
    : [KindTypes[KindOf<H>], ...OpParams<T>]
  : [];

/** The Backend's op methods, one per entry of OPS. */
export type BackendOps = {
  [K in OpName]: (...args: OpParams<(typeof OPS)[K]["args"]>) => void;
};

type P = number | null; // a native address (null = NULL)

interface FFITypes {
  ptr: P | ArrayBufferView; // TypedArray arguments are converted at call time
  i32: number;
  i64: number;
  u64: number;
  f32: number;
  f64: number;
  void: void;
  cstring: { toString(): string };
}
/** An op's native parameters after the context: optional pointers are NULL, not absent. */
type NativeOpParams<A extends readonly unknown[]> = {
  -readonly [I in keyof A]: KindOf<A[I]> extends "ptr?" ? P : KindTypes[KindOf<A[I]>];
};
type Returned<R extends FFIName> = R extends "ptr" ? P : FFITypes[R];
type FFIParams<A extends readonly FFIName[]> = { -readonly [I in keyof A]: A[I] extends FFIName ? FFITypes[A[I]] : never };

/** The dlopen'd functions, typed from the tables. */
export type NativeSymbols = {
  [K in keyof typeof LIBRARY]: (...args: FFIParams<(typeof LIBRARY)[K]["args"]>) => Returned<(typeof LIBRARY)[K]["returns"]>;
} & {
  [K in OpName as (typeof OPS)[K]["symbol"]]: (ctx: P, ...args: NativeOpParams<(typeof OPS)[K]["args"]>) => number;
};

// ---- values derived from the tables -----------------------------------------------

function kindOf(arg: ArgSpec): Kind {
  return arg.slice(arg.lastIndexOf(":") + 1) as Kind;
}

/** The symbol list handed to dlopen: the library functions and every op. */
type Binding = { args: FFIName[]; returns: FFIName };
export const SYMBOLS: Record<string, Binding> = {
  ...Object.fromEntries(
    Object.entries(LIBRARY).map(([name, fn]): [string, Binding] => [name, { args: [...fn.args], returns: fn.returns }]),
  ),
  ...Object.fromEntries(
    Object.values(OPS).map((op: OpSpec): [string, Binding] => [op.symbol, { args: ["ptr", ...op.args.map((a) => KIND_FFI[kindOf(a)])], returns: "i32" }]),
  ),
};

export const SI_FLAG_REFERENCE = 1;
/** si_create's flags carry the CUDA device index in these bits (ignored on the CPU). */
export const SI_DEVICE_SHIFT = 8;
export const SI_DEVICE_MASK = 0xffff;

/** The ops of Backend as one native call each; memory management is the subclass's. */
export interface NativeOps extends BackendOps {}

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

  // One method per op on the prototype: the call with NULL for empty optional pointers,
  // then the status check naming the op.
  static {
    for (const [name, op] of Object.entries(OPS) as [OpName, OpSpec][]) {
      const kinds = op.args.map(kindOf);
      const nullable = kinds.flatMap((kind, i) => (kind === "ptr?" ? [i] : []));
      const required = kinds.length - (kinds[kinds.length - 1] === "ptr?" ? 1 : 0);
      const arity = required === kinds.length ? `${required}` : `${required} to ${kinds.length}`;
      Object.defineProperty(NativeOps.prototype, name, {
        value: function (this: NativeOps, ...args: (P | number)[]): void {
          if (args.length < required || args.length > kinds.length) {
            throw new BackendError(name, 1, `takes ${arity} arguments (${op.args.join(", ")}), got ${args.length}`);
          }
          for (const i of nullable) args[i] ||= null;
          const lib = this.lib as unknown as Record<string, (ctx: P, ...rest: (P | number)[]) => number>;
          this.check(name, lib[op.symbol](this.live, ...args));
        },
        writable: true,
        configurable: true,
      });
    }
  }
}

// Communication between the devices of a group (tensor parallelism): one small
// interface, two implementations.
//   HostAllReduce  CPU backend contexts: "device" memory is host memory, so rank 0 sums
//                  every rank's buffer into its own and copies the sum back, with
//                  backend ops (no JS loop over elements).
//   NcclAllReduce  CUDA contexts: NCCL, which cuda/nccl.cu loads at run time with
//                  dlopen("libnccl.so.2"); nothing NCCL is needed to build.

import { dlopen } from "bun:ffi";
import { type Backend, BackendError, type DeviceBuffer, DType, type Ptr } from "./backend.ts";
import { cudaLibraryPath } from "./cuda.ts";

export interface Communicator {
  /** Ranks taking part. */
  readonly size: number;
  /** In place on every rank: buffers[r] (f32, `count` elements, on rank r) := the sum of
   *  all ranks' buffers. Every rank ends with the same bits. */
  allReduceSum(buffers: readonly Ptr[], count: number): void;
  close(): void;
}

function checkCall(size: number, buffers: readonly Ptr[], count: number): void {
  if (buffers.length !== size) throw new BackendError("allReduceSum", 1, `${buffers.length} buffers given for ${size} ranks`);
  if (!Number.isSafeInteger(count) || count < 0 || count > 0x7fffffff) {
    throw new BackendError("allReduceSum", 1, `count=${count} must be an integer in [0, 2^31)`);
  }
}

/** CPU ranks (or one rank of any kind). */
export class HostAllReduce implements Communicator {
  readonly size: number;
  /** A zero row index per rank: an f32 "embedding" lookup of row 0 is a native copy. */
  private readonly rowZero: DeviceBuffer[];

  constructor(private readonly ranks: readonly Backend[]) {
    if (ranks.length < 1) throw new BackendError("HostAllReduce", 1, "needs at least one rank");
    // One rank of any kind has nothing to sum.
    const notCpu = ranks.length > 1 ? ranks.findIndex((b) => b.name !== "cpu") : -1;
    if (notCpu >= 0) throw new BackendError("HostAllReduce", 1, `rank ${notCpu} is a ${ranks[notCpu]!.name} backend; the host all-reduce needs CPU backends (use NCCL for CUDA)`);
    this.size = ranks.length;
    this.rowZero = ranks.length > 1 ? ranks.map((b) => b.alloc(4)) : []; // si_alloc zero-fills
  }

  allReduceSum(buffers: readonly Ptr[], count: number): void {
    checkCall(this.size, buffers, count);
    if (count === 0 || this.size === 1) return;
    const lead = this.ranks[0]!;
    // A fixed order ((b0 + b1) + b2) + ..., computed once, so all ranks agree bitwise.
    for (let r = 1; r < this.size; r++) lead.add(buffers[0]!, buffers[r]!, count);
    for (let r = 1; r < this.size; r++) this.ranks[r]!.embedding(buffers[0]!, DType.F32, 1, count, this.rowZero[r]!.ptr, 1, buffers[r]!);
  }

  close(): void {
    this.rowZero.forEach((buf, r) => this.ranks[r]!.free(buf));
    this.rowZero.length = 0;
  }
}

// ---- NCCL ---------------------------------------------------------------------------

const NCCL_SYMBOLS = {
  si_nccl_create: { args: ["i32", "ptr"], returns: "ptr" },
  si_nccl_error: { args: ["ptr"], returns: "cstring" },
  si_nccl_all_reduce_sum: { args: ["ptr", "ptr", "ptr", "i64"], returns: "i32" },
  si_nccl_destroy: { args: ["ptr"], returns: "void" },
} as const;

interface NcclSymbols {
  si_nccl_create(n: number, devices: Int32Array): number | null;
  si_nccl_error(h: number): { toString(): string };
  si_nccl_all_reduce_sum(h: number, ctxs: Uint32Array, bufs: Uint32Array, count: number): number;
  si_nccl_destroy(h: number): void;
}

let nccl: NcclSymbols | null = null;

function ncclSymbols(): NcclSymbols {
  if (nccl) return nccl;
  const path = cudaLibraryPath();
  try {
    nccl = dlopen(path, NCCL_SYMBOLS).symbols as unknown as NcclSymbols;
  } catch (e) {
    throw new BackendError("nccl", -1, `cannot load ${path} (${(e as Error).message}); it is built by \`npm run build\` where nvcc exists`);
  }
  return nccl;
}

/** Writes native addresses as (low, high) 32-bit pairs: a uint64 array natively, no BigInt. */
function putAddresses(dst: Uint32Array, addresses: readonly number[]): void {
  addresses.forEach((a, i) => {
    dst[2 * i] = a >>> 0;
    dst[2 * i + 1] = Math.floor(a / 2 ** 32);
  });
}

/** A CUDA rank: its si_ctx (whose stream orders the all-reduce) and its device. */
export interface CudaRank {
  readonly nativeContext: number;
  readonly device: number;
}

export class NcclAllReduce implements Communicator {
  readonly size: number;
  private handle: number | null;
  // 4 KiB each: not the small movable arrays Bun may relocate (TRAPS.md); passed as
  // arguments (converted at each call), never as a cached ptr().
  private readonly ctxs = new Uint32Array(1024);
  private readonly bufs = new Uint32Array(1024);

  /** One NCCL communicator per rank, all in this process (ncclCommInitAll). Throws a
   *  BackendError naming libnccl.so.2 when it cannot be loaded. */
  constructor(ranks: readonly CudaRank[]) {
    if (ranks.length < 1 || ranks.length > 512) throw new BackendError("nccl", 1, `${ranks.length} ranks; 1..512 are supported`);
    const lib = ncclSymbols();
    const h = lib.si_nccl_create(ranks.length, Int32Array.from(ranks, (r) => r.device));
    if (h === null) throw new BackendError("nccl", 2, "si_nccl_create returned NULL (out of memory)");
    const err = String(lib.si_nccl_error(h));
    if (err !== "") {
      lib.si_nccl_destroy(h);
      throw new BackendError("nccl", 3, err);
    }
    this.size = ranks.length;
    this.handle = h;
    putAddresses(this.ctxs, ranks.map((r) => r.nativeContext));
  }

  allReduceSum(buffers: readonly Ptr[], count: number): void {
    checkCall(this.size, buffers, count);
    if (this.handle === null) throw new BackendError("allReduceSum", -1, "the NCCL communicator was closed");
    if (count === 0) return;
    putAddresses(this.bufs, buffers);
    const lib = ncclSymbols();
    const rc = lib.si_nccl_all_reduce_sum(this.handle, this.ctxs, this.bufs, count);
    if (rc !== 0) throw new BackendError("allReduceSum", rc, String(lib.si_nccl_error(this.handle)));
  }

  close(): void {
    if (this.handle === null) return;
    ncclSymbols().si_nccl_destroy(this.handle);
    this.handle = null;
  }
}

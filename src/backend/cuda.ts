// The CUDA backend: zig-out/lib/libspecinfer_cuda.so (cuda/*.cu) over bun:ffi, one
// context per GPU (CudaBackendOptions.device).
// Same binding table as the CPU (abi.ts); what differs is memory: buffers live on the GPU
// (DeviceBuffer.host is null), weights() uploads a copy of the mapped bytes once, and
// upload/download copy through the library (synchronously, so JS arrays are free to
// reuse when they return).
//
// Index-array contents (token ids, slots, block tables, masks) are checked on the GPU and
// reported by the next sync()/download() (see cuda/context.cuh); `checked: true` makes
// every op wait and report at once, like the CPU backend.

import { dlopen } from "bun:ffi";
import { type NativeSymbols, SI_DEVICE_MASK, SI_DEVICE_SHIFT, SI_FLAG_REFERENCE } from "./abi.ts";
import type { Backend, MappedFile, Ptr } from "./backend.ts";
import { BackendError } from "./backend.ts";
import { libraryPath, loadLibrary, NativeBackend } from "./native.ts";

export function cudaLibraryPath(): string {
  return libraryPath("SPECINFER_CUDA_LIB", "libspecinfer_cuda.so");
}

const MISSING = "it is built by `npm run build` only where nvcc (the CUDA toolkit) is installed";

export interface CudaBackendOptions {
  /** Wait after every op and report bad index arrays at once (slower; for tests). */
  checked?: boolean;
  /** The GPU the context runs on: its stream, memory and graphs live there. Default 0. */
  device?: number;
}

/** GPUs the CUDA runtime sees; `problem` says why it could count none (no driver...). */
export interface CudaDevices {
  count: number;
  problem: string | null;
}

let countSymbol: (() => number) | null = null;

/** Counts the GPUs through the CUDA library (si_cuda_device_count, CUDA-only: not part
 *  of the ABI both libraries share). Throws BackendError when the library is missing. */
export function cudaDevices(): CudaDevices {
  if (!countSymbol) {
    const path = cudaLibraryPath();
    loadLibrary(path, MISSING); // the same clear error when it is not built
    const { symbols } = dlopen(path, { si_cuda_device_count: { args: [], returns: "i32" } });
    countSymbol = symbols.si_cuda_device_count as () => number;
  }
  const n = countSymbol();
  return n >= 0 ? { count: n, problem: null } : { count: 0, problem: `cudaGetDeviceCount failed with CUDA error ${-n}` };
}

export class CudaBackend extends NativeBackend implements Backend {
  readonly name = "cuda" as const;
  /** Uploaded weight ranges per mapped file: "offset:bytes" -> device address. */
  private readonly uploaded = new WeakMap<MappedFile, Map<string, Ptr>>();

  private constructor(
    lib: NativeSymbols,
    ctx: number,
    /** The GPU index this context runs on. */
    readonly device: number,
  ) {
    super(lib, ctx);
  }

  /** Opens GPU `device` (default 0). Throws BackendError when the library is missing, the
   *  index is bad, or that GPU is not usable (absent: the message names the GPU count). */
  static create(opts: CudaBackendOptions = {}): CudaBackend {
    const device = opts.device ?? 0;
    if (!Number.isInteger(device) || device < 0 || device > SI_DEVICE_MASK) {
      throw new BackendError("create", 1, `device must be an integer in 0..${SI_DEVICE_MASK}, got ${device}`);
    }
    const lib = loadLibrary(cudaLibraryPath(), MISSING);
    const ctx = lib.si_create(0, (opts.checked ? SI_FLAG_REFERENCE : 0) | (device << SI_DEVICE_SHIFT));
    if (ctx === null) throw new BackendError("create", 2, "si_create returned NULL (out of memory)");
    // A context without a usable device still exists, to say why: si_sync reports it.
    const rc = lib.si_sync(ctx);
    if (rc !== 0) {
      const msg = String(lib.si_last_error(ctx));
      lib.si_destroy(ctx);
      throw new BackendError("create", rc, `no usable CUDA GPU ${device}: ${msg}`);
    }
    return new CudaBackend(lib, ctx, device);
  }

  protected hostView(): null {
    return null;
  }

  /** The native si_ctx, for NCCL (src/backend/comm.ts), which enqueues on its stream. */
  get nativeContext(): number {
    return this.live as number;
  }

  addressOf(): null {
    return null;
  }

  /** Uploads `bytes` bytes at `offset` of the file once; later calls return the same copy. */
  weights(file: MappedFile, offset: number, bytes: number): Ptr {
    this.checkRange(file, offset, bytes);
    let perFile = this.uploaded.get(file);
    if (!perFile) {
      perFile = new Map();
      this.uploaded.set(file, perFile);
    }
    const key = `${offset}:${bytes}`;
    const hit = perFile.get(key);
    if (hit !== undefined) return hit;
    const buf = this.alloc(bytes);
    // The view works for real mappings and for in-memory MappedFiles (ptr 0) alike.
    this.upload(buf.ptr, file.bytes.subarray(offset, offset + bytes));
    perFile.set(key, buf.ptr);
    return buf.ptr;
  }
}

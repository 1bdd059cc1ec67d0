// The CUDA backend: zig-out/lib/libspecinfer_cuda.so (cuda/specinfer.cu) over bun:ffi.
// Same binding table as the CPU (abi.ts); what differs is memory: buffers live on the GPU
// (DeviceBuffer.host is null), weights() uploads a copy of the mapped bytes once, and
// upload/download copy through the library (synchronously, so JS arrays are free to
// reuse when they return).
//
// Index-array contents (token ids, slots, block tables, masks) are checked on the GPU and
// reported by the next sync()/download() (see cuda/specinfer.cu); `checked: true` makes
// every op wait and report at once, like the CPU backend.

import { SI_FLAG_REFERENCE } from "./abi.ts";
import type { Backend, MappedFile, Ptr } from "./backend.ts";
import { BackendError } from "./backend.ts";
import { libraryPath, loadLibrary, NativeBackend } from "./native.ts";

export function cudaLibraryPath(): string {
  return libraryPath("SPECINFER_CUDA_LIB", "libspecinfer_cuda.so");
}

export interface CudaBackendOptions {
  /** Wait after every op and report bad index arrays at once (slower; for tests). */
  checked?: boolean;
}

export class CudaBackend extends NativeBackend implements Backend {
  readonly name = "cuda" as const;
  /** Uploaded weight ranges per mapped file: "offset:bytes" -> device address. */
  private readonly uploaded = new WeakMap<MappedFile, Map<string, Ptr>>();

  /** Opens device 0. Throws BackendError when the library is missing or no GPU is usable. */
  static create(opts: CudaBackendOptions = {}): CudaBackend {
    const lib = loadLibrary(cudaLibraryPath(), "it is built by `npm run build` only where nvcc (the CUDA toolkit) is installed");
    const ctx = lib.si_create(0, opts.checked ? SI_FLAG_REFERENCE : 0);
    if (ctx === null) throw new BackendError("create", 2, "si_create returned NULL (out of memory)");
    // A context without a usable device still exists, to say why: si_sync reports it.
    const rc = lib.si_sync(ctx);
    if (rc !== 0) {
      const msg = String(lib.si_last_error(ctx));
      lib.si_destroy(ctx);
      throw new BackendError("create", rc, `no usable CUDA GPU: ${msg}`);
    }
    return new CudaBackend(lib, ctx);
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

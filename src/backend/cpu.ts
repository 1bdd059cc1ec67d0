// The CPU backend: zig-out/lib/libspecinfer_cpu.so (ffi/) over bun:ffi.
// "Device" memory is host memory here, so DeviceBuffer.host is a live JS view of it and
// weights() is the mapping itself (no copy).

import { ptr, toArrayBuffer } from "bun:ffi";
import { SI_FLAG_REFERENCE } from "./abi.ts";
import type { Backend, MappedFile, Ptr } from "./backend.ts";
import { BackendError } from "./backend.ts";
import { libraryPath, loadLibrary, NativeBackend } from "./native.ts";

export function cpuLibraryPath(): string {
  return libraryPath("SPECINFER_CPU_LIB", "libspecinfer_cpu.so");
}

export interface CpuBackendOptions {
  /** Worker threads including the caller; default one per core. */
  threads?: number;
  /** Use the scalar reference kernels (tests compare them to the SIMD ones). */
  reference?: boolean;
}

export class CpuBackend extends NativeBackend implements Backend {
  readonly name = "cpu" as const;

  static create(opts: CpuBackendOptions = {}): CpuBackend {
    const lib = loadLibrary(cpuLibraryPath(), "run `npm run build` to build the native kernels");
    const ctx = lib.si_create(opts.threads ?? 0, opts.reference ? SI_FLAG_REFERENCE : 0);
    if (ctx === null) throw new BackendError("create", 2, "si_create returned NULL (out of memory)");
    return new CpuBackend(lib, ctx);
  }

  protected hostView(p: Ptr, bytes: number): ArrayBuffer {
    return bytes > 0 ? toArrayBuffer(p, 0, bytes) : new ArrayBuffer(0);
  }

  addressOf(view: ArrayBufferView): Ptr | null {
    return view.byteLength > 0 ? ptr(view as Uint8Array) : null;
  }

  weights(file: MappedFile, offset: number, bytes: number): Ptr {
    this.checkRange(file, offset, bytes);
    return file.ptr + offset;
  }
}

// What the CPU and CUDA backends share beyond the op table (abi.ts): finding and
// loading a library, buffer bookkeeping, host<->device copies, file mappings and the
// out-parameters of native calls. A subclass says only how device memory is seen
// from JS (hostView) and how weights reach the device (weights).

import { dlopen, ptr, toArrayBuffer } from "bun:ffi";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { NATIVE_LIB_DIR } from "./paths.ts";
import { NativeOps, SYMBOLS, type NativeSymbols } from "./abi.ts";
import { BackendError, type DeviceBuffer, type MappedFile, type Ptr } from "./backend.ts";
import { cpuVariant } from "./variant.ts";

/** Libraries built twice (build.zig): name -> its portable x86-64-v3 build. */
const PORTABLE_BUILDS: Record<string, string> = { "libspecinfer_cpu.so": "libspecinfer_cpu_v3.so" };

/** $`envVar`, else `name` in zig-out/lib (lib/ beside a compiled executable); for a
 *  library built twice, the build this CPU runs (variant.ts). */
export function libraryPath(envVar: string, name: string): string {
  const env = process.env[envVar];
  if (env) return env;
  const portable = PORTABLE_BUILDS[name];
  return join(NATIVE_LIB_DIR, portable && cpuVariant() === "portable" ? portable : name);
}

const loaded = new Map<string, NativeSymbols>();

/** dlopens `path` once; `missing` tells the user how to get the library. */
export function loadLibrary(path: string, missing: string): NativeSymbols {
  const hit = loaded.get(path);
  if (hit) return hit;
  if (!existsSync(path)) throw new BackendError("load", -1, `${path} not found: ${missing}`);
  try {
    const lib = dlopen(path, SYMBOLS).symbols as unknown as NativeSymbols;
    loaded.set(path, lib);
    return lib;
  } catch (e) {
    throw new BackendError("load", -1, `cannot load ${path} (${(e as Error).message}); run \`npm run build\``);
  }
}

function bytesOf(v: ArrayBufferView): Uint8Array {
  return v instanceof Uint8Array ? v : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

export abstract class NativeBackend extends NativeOps {
  readonly threads: number;
  /** Host out-parameters (si_map_file's size, the probe's GB/s). 8 KiB, so not a small
   *  movable array; its ptr() is taken at each call, never cached (TRAPS.md). */
  private readonly out = new Float64Array(1024);
  private readonly outU64 = new BigUint64Array(this.out.buffer);
  private readonly buffers = new Set<number>();

  protected constructor(lib: NativeSymbols, ctx: number) {
    super(lib, ctx);
    this.threads = lib.si_threads(ctx);
  }

  /** A JS view of device memory (CPU), or null where there is none (GPU). */
  protected abstract hostView(p: Ptr, bytes: number): ArrayBuffer | null;

  abstract weights(file: MappedFile, offset: number, bytes: number): Ptr;

  alloc(bytes: number): DeviceBuffer {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new BackendError("alloc", 1, `bytes=${bytes} must be a non-negative integer`);
    }
    const p = this.lib.si_alloc(this.live, bytes);
    if (p === null) throw new BackendError("alloc", 2, this.lastError());
    this.buffers.add(p);
    return { ptr: p, bytes, host: this.hostView(p, bytes) };
  }

  /** Frees a buffer from alloc(); its `host` view must not be used afterwards. */
  free(buf: DeviceBuffer): void {
    if (!this.buffers.delete(buf.ptr)) {
      throw new BackendError("free", 1, `0x${buf.ptr.toString(16)} is not a live buffer of this backend`);
    }
    this.check("free", this.lib.si_free(this.live, buf.ptr));
  }

  upload(dst: Ptr, src: ArrayBufferView): void {
    if (src.byteLength === 0) return;
    this.check("upload", this.lib.si_upload(this.live, dst, bytesOf(src), src.byteLength));
  }

  download(dst: ArrayBufferView, src: Ptr): void {
    if (dst.byteLength === 0) return;
    this.check("download", this.lib.si_download(this.live, bytesOf(dst), src, dst.byteLength));
  }

  mapFile(path: string, populate = false): MappedFile {
    const cpath = Buffer.from(`${path}\0`, "utf8");
    const base = this.lib.si_map_file(this.live, cpath, populate ? 1 : 0, ptr(this.outU64));
    if (base === null) throw new BackendError("mapFile", 3, this.lastError());
    const size = Number(this.outU64[0]);
    // File mappings are host memory on every backend.
    const bytes = new Uint8Array(toArrayBuffer(base, 0, size));
    const owner = this;
    let open = true;
    return {
      path,
      size,
      bytes,
      ptr: base,
      // Idempotent. On the CPU, `bytes` and weights() addresses die with the mapping.
      close(): void {
        if (!open) return;
        open = false;
        if (owner.ctx !== null) owner.check("unmapFile", owner.lib.si_unmap_file(owner.ctx, base, size));
      },
    };
  }

  probeBandwidth(buf: Ptr, bytes: number, reps: number): number {
    this.check("probeBandwidth", this.lib.si_probe_bandwidth(this.live, buf, bytes, reps, ptr(this.out)));
    return this.out[0];
  }

  /** Destroys the context (idempotent). Buffers from alloc() go with it. */
  close(): void {
    if (this.ctx === null) return;
    const ctx = this.ctx;
    for (const p of this.buffers) this.lib.si_free(ctx, p);
    this.buffers.clear();
    this.lib.si_destroy(ctx);
    this.ctx = null;
  }

  /** Refuses a byte range outside a mapped file. */
  protected checkRange(file: MappedFile, offset: number, bytes: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0 || offset + bytes > file.size) {
      throw new BackendError("weights", 1, `range [${offset}, ${offset + bytes}) is outside ${file.path} (${file.size} bytes)`);
    }
  }
}

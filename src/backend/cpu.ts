// The CPU backend: zig-out/lib/libspecinfer_cpu.so (ffi/) over bun:ffi.
// "Device" memory is host memory here, so DeviceBuffer.host is a live JS view of it and
// weights() is the mapping itself (no copy).

import { dlopen, toArrayBuffer } from "bun:ffi";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { NativeOps, SI_FLAG_REFERENCE, SYMBOLS, type NativeSymbols } from "./abi.ts";
import { BackendError, type Backend, type DeviceBuffer, type MappedFile, type Ptr } from "./backend.ts";

const LIB_NAME = "libspecinfer_cpu.so";

/** Where the library may be: $SPECINFER_CPU_LIB, the repo's zig-out, or next to a
 *  `bun build --compile` executable (import.meta.dir is then inside /$bunfs/). */
export function cpuLibraryPath(): string {
  const env = process.env.SPECINFER_CPU_LIB;
  if (env) return env;
  const inRepo = join(import.meta.dir, "..", "..", "zig-out", "lib", LIB_NAME);
  if (existsSync(inRepo) || !import.meta.dir.startsWith("/$bunfs/")) return inRepo;
  return join(dirname(process.execPath), LIB_NAME);
}

let loaded: NativeSymbols | null = null;

function load(): NativeSymbols {
  if (loaded) return loaded;
  const path = cpuLibraryPath();
  if (!existsSync(path)) {
    throw new BackendError("load", -1, `${path} not found: run \`npm run build\` to build the native kernels`);
  }
  try {
    loaded = dlopen(path, SYMBOLS).symbols as unknown as NativeSymbols;
  } catch (e) {
    throw new BackendError("load", -1, `cannot load ${path} (${(e as Error).message}); run \`npm run build\``);
  }
  return loaded;
}

function bytesOf(v: ArrayBufferView): Uint8Array {
  return v instanceof Uint8Array ? v : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

export interface CpuBackendOptions {
  /** Worker threads including the caller; default one per core. */
  threads?: number;
  /** Use the scalar reference kernels (tests compare them to the SIMD ones). */
  reference?: boolean;
}

export class CpuBackend extends NativeOps implements Backend {
  readonly name = "cpu" as const;
  readonly threads: number;
  /** Native out-parameters of si_map_file / si_probe_bandwidth (never JS memory: TRAPS). */
  private readonly outPtr: number;
  private readonly outU64: BigUint64Array;
  private readonly outF64: Float64Array;
  private readonly buffers = new Set<number>();

  private constructor(lib: NativeSymbols, ctx: number) {
    super(lib, ctx);
    this.threads = lib.si_threads(ctx);
    const out = lib.si_alloc(ctx, 64);
    if (out === null) {
      const msg = String(lib.si_last_error(ctx));
      lib.si_destroy(ctx);
      throw new BackendError("create", 2, msg);
    }
    this.outPtr = out;
    this.outU64 = new BigUint64Array(toArrayBuffer(out, 0, 64));
    this.outF64 = new Float64Array(toArrayBuffer(out, 0, 64));
  }

  static create(opts: CpuBackendOptions = {}): CpuBackend {
    const lib = load();
    const ctx = lib.si_create(opts.threads ?? 0, opts.reference ? SI_FLAG_REFERENCE : 0);
    if (ctx === null) throw new BackendError("create", 2, "si_create returned NULL (out of memory)");
    return new CpuBackend(lib, ctx);
  }

  alloc(bytes: number): DeviceBuffer {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new BackendError("alloc", 1, `bytes=${bytes} must be a non-negative integer`);
    }
    const p = this.lib.si_alloc(this.live, bytes);
    if (p === null) throw new BackendError("alloc", 2, this.lastError());
    this.buffers.add(p);
    const host = bytes > 0 ? toArrayBuffer(p, 0, bytes) : new ArrayBuffer(0);
    return { ptr: p, bytes, host };
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
    const base = this.lib.si_map_file(this.live, cpath, populate ? 1 : 0, this.outPtr);
    if (base === null) throw new BackendError("mapFile", 3, this.lastError());
    const size = Number(this.outU64[0]);
    const bytes = new Uint8Array(toArrayBuffer(base, 0, size));
    const lib = this.lib;
    const owner = this;
    let open = true;
    return {
      path,
      size,
      bytes,
      ptr: base,
      // Idempotent. `bytes` (and any weights() address) must not be used afterwards.
      close(): void {
        if (!open) return;
        open = false;
        if (owner.ctx !== null) owner.check("unmapFile", lib.si_unmap_file(owner.ctx, base, size));
      },
    };
  }

  weights(file: MappedFile, offset: number, bytes: number): Ptr {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0 ||
      offset + bytes > file.size) {
      throw new BackendError(
        "weights", 1, `range [${offset}, ${offset + bytes}) is outside ${file.path} (${file.size} bytes)`,
      );
    }
    return file.ptr + offset;
  }

  probeBandwidth(buf: Ptr, bytes: number, reps: number): number {
    this.check("probeBandwidth", this.lib.si_probe_bandwidth(this.live, buf, bytes, reps, this.outPtr + 8));
    return this.outF64[1];
  }

  /** Destroys the context (idempotent). Buffers from alloc() are freed with it. */
  close(): void {
    if (this.ctx === null) return;
    const ctx = this.ctx;
    for (const p of this.buffers) this.lib.si_free(ctx, p);
    this.buffers.clear();
    this.lib.si_free(ctx, this.outPtr);
    this.lib.si_destroy(ctx);
    this.ctx = null;
  }
}

// The CUDA backend: zig-out/lib/libspecinfer_cuda.so (cuda/specinfer.cu) over bun:ffi.
// Same binding table as the CPU (abi.ts); what differs is memory: buffers live on the GPU
// (DeviceBuffer.host is null), weights() uploads a copy of the mapped bytes once, and
// upload/download copy through the library (synchronously, so JS arrays are free to
// reuse when they return).
//
// Index-array contents (token ids, slots, block tables, masks) are checked on the GPU and
// reported by the next sync()/download() (see cuda/specinfer.cu); `checked: true` makes
// every op wait and report at once, like the CPU backend.

import { dlopen, ptr, toArrayBuffer } from "bun:ffi";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { NativeOps, SI_FLAG_REFERENCE, SYMBOLS, type NativeSymbols } from "./abi.ts";
import { BackendError, type Backend, type DeviceBuffer, type MappedFile, type Ptr } from "./backend.ts";

const LIB_NAME = "libspecinfer_cuda.so";

/** $SPECINFER_CUDA_LIB, the repo's zig-out, or next to a `bun build --compile` executable. */
export function cudaLibraryPath(): string {
  const env = process.env.SPECINFER_CUDA_LIB;
  if (env) return env;
  const inRepo = join(import.meta.dir, "..", "..", "zig-out", "lib", LIB_NAME);
  if (existsSync(inRepo) || !import.meta.dir.startsWith("/$bunfs/")) return inRepo;
  return join(dirname(process.execPath), LIB_NAME);
}

let loaded: NativeSymbols | null = null;

function load(): NativeSymbols {
  if (loaded) return loaded;
  const path = cudaLibraryPath();
  if (!existsSync(path)) {
    throw new BackendError(
      "load", -1,
      `${path} not found: it is built by \`npm run build\` only where nvcc (the CUDA toolkit) is installed`,
    );
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

export interface CudaBackendOptions {
  /** Wait after every op and report bad index arrays at once (slower; for tests). */
  checked?: boolean;
}

export class CudaBackend extends NativeOps implements Backend {
  readonly name = "cuda" as const;
  readonly threads: number;
  /** Host out-parameters (si_map_file size, probe GB/s). 8 KiB so the array is not a small
   *  movable one; its ptr() is taken at each call, never cached (TRAPS.md). */
  private readonly out = new Float64Array(1024);
  private readonly outU64 = new BigUint64Array(this.out.buffer);
  private readonly buffers = new Set<number>();
  /** Uploaded weight ranges per mapped file: "offset:bytes" -> device address. */
  private readonly uploaded = new WeakMap<MappedFile, Map<string, Ptr>>();

  private constructor(lib: NativeSymbols, ctx: number) {
    super(lib, ctx);
    this.threads = lib.si_threads(ctx);
  }

  /** Opens device 0. Throws BackendError when the library is missing or no GPU is usable. */
  static create(opts: CudaBackendOptions = {}): CudaBackend {
    const lib = load();
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

  alloc(bytes: number): DeviceBuffer {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new BackendError("alloc", 1, `bytes=${bytes} must be a non-negative integer`);
    }
    const p = this.lib.si_alloc(this.live, bytes);
    if (p === null) throw new BackendError("alloc", 2, this.lastError());
    this.buffers.add(p);
    return { ptr: p, bytes, host: null };
  }

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
    const bytes = new Uint8Array(toArrayBuffer(base, 0, size));
    const lib = this.lib;
    const owner = this;
    let open = true;
    return {
      path,
      size,
      bytes,
      ptr: base,
      // Idempotent. Uploaded weights stay valid: they are copies.
      close(): void {
        if (!open) return;
        open = false;
        if (owner.ctx !== null) owner.check("unmapFile", lib.si_unmap_file(owner.ctx, base, size));
      },
    };
  }

  /** Uploads `bytes` bytes at `offset` of the file once; later calls return the same copy. */
  weights(file: MappedFile, offset: number, bytes: number): Ptr {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0 ||
      offset + bytes > file.size) {
      throw new BackendError(
        "weights", 1, `range [${offset}, ${offset + bytes}) is outside ${file.path} (${file.size} bytes)`,
      );
    }
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

  probeBandwidth(buf: Ptr, bytes: number, reps: number): number {
    this.check("probeBandwidth", this.lib.si_probe_bandwidth(this.live, buf, bytes, reps, ptr(this.out)));
    return this.out[0];
  }

  /** Destroys the context (idempotent). Buffers from alloc() and weights() go with it. */
  close(): void {
    if (this.ctx === null) return;
    const ctx = this.ctx;
    for (const p of this.buffers) this.lib.si_free(ctx, p);
    this.buffers.clear();
    this.lib.si_destroy(ctx);
    this.ctx = null;
  }
}

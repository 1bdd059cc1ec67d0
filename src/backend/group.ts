// A device group: N backend contexts of one kind that act as N devices (CPU contexts
// with their own threads, or CUDA contexts, one GPU each), the communicator between the first
// `tensorParallel` of them, per-rank buffers behind one handle, and weight shards.
//
// Sharding a row-major weight [rows, cols] (HF [out, in]; GGUF's ne = [in, out] is the
// same bytes) over `size` ranks, Megatron style:
//   column-parallel (split the outputs): rank r holds rows [r*rows/size, (r+1)*rows/size),
//     contiguous bytes, so on the CPU its weights are a pointer into the file mapping;
//     rows of a quantized type are whole blocks, so any row split is.
//   row-parallel (split the inputs): rank r holds columns [r*cols/size, ...) of every
//     row: strided, so only that slice is copied (never the whole tensor); a quantized
//     slice must start and end on a 32-element block.

import { type Backend, BackendError, type DeviceBuffer, DType, DTYPE_NAMES, dtypeBytes, type MappedFile, type Ptr } from "./backend.ts";
import { type Communicator, HostAllReduce, NcclAllReduce } from "./comm.ts";
import { CpuBackend } from "./cpu.ts";
import type { CudaBackend, CudaDevices } from "./cuda.ts";

export type Split = "column" | "row";

/** The part of a [rows, cols] weight of `dtype` that rank `rank` of `size` holds. */
export interface Shard {
  split: Split;
  rank: number;
  size: number;
  rows: number;
  cols: number;
  dtype: DType;
}

const BLOCK_ELEMENTS: Partial<Record<DType, number>> = { [DType.Q8_0]: 32, [DType.Q4_0]: 32 };

/** Why `shard` cannot be cut (numbers included), or null when it can. */
export function shardProblem(s: Shard): string | null {
  if (!Number.isInteger(s.size) || s.size < 1) return `${s.size} devices: must be a positive integer`;
  if (!Number.isInteger(s.rank) || s.rank < 0 || s.rank >= s.size) return `rank ${s.rank} is outside 0..${s.size - 1}`;
  const along = s.split === "column" ? s.rows : s.cols;
  const what = s.split === "column" ? "output rows" : "input columns";
  if (along % s.size !== 0) return `its ${along} ${what} do not divide by ${s.size} devices`;
  const block = BLOCK_ELEMENTS[s.dtype] ?? 1;
  if (s.split === "row" && (s.cols / s.size) % block !== 0) {
    return `it is ${DTYPE_NAMES[s.dtype]} with ${s.cols} input columns: ${s.cols / s.size} per device is not a whole number of ${block}-element blocks`;
  }
  return null;
}

/** Rows per rank and the [rows, cols] of one rank's part. */
export function shardShape(s: Shard): { rows: number; cols: number } {
  return s.split === "column" ? { rows: s.rows / s.size, cols: s.cols } : { rows: s.rows, cols: s.cols / s.size };
}

/** Buffers of the same size, one per rank, freed together. */
export interface GroupBuffer {
  readonly bytes: number;
  /** ptrs[r] lives on rank r. */
  readonly ptrs: readonly Ptr[];
}

export interface DeviceGroupOptions {
  kind?: "cpu" | "cuda";
  /** Devices (backend contexts) in the group; default tensorParallel. */
  devices?: number;
  /** Ranks the LLM is split over: devices 0..tensorParallel-1. Default 1. */
  tensorParallel?: number;
  /** CPU: threads per device context (default: the cores shared out evenly). */
  threads?: number;
}

export class DeviceGroup {
  /** Ranks of tensor parallelism: devices[0..tensorParallel). */
  readonly tensorParallel: number;
  readonly comm: Communicator;
  private readonly owned = new Map<Ptr, DeviceBuffer[]>();
  /** Row-parallel copies made from each file: "offset bytes rank size" -> its buffer. */
  private readonly copies = new WeakMap<MappedFile, Map<string, { rank: number; buf: DeviceBuffer }>>();

  /** Takes ownership of `devices` (closed with the group). */
  constructor(readonly devices: readonly Backend[], tensorParallel: number, comm?: Communicator) {
    checkCount("tensorParallel", tensorParallel);
    if (tensorParallel > devices.length) throw new BackendError("group", 1, `tensorParallel=${tensorParallel} needs that many devices; the group has ${devices.length}`);
    const kinds = new Set(devices.map((d) => d.name));
    if (kinds.size > 1) throw new BackendError("group", 1, `a group holds devices of one kind, got ${[...kinds].join(" and ")}`);
    this.tensorParallel = tensorParallel;
    this.comm = comm ?? new HostAllReduce(devices.slice(0, tensorParallel));
  }

  /** Opens `devices` contexts of one kind (CPU: each with `threads` threads; CUDA: device
   *  d on GPU d, refused with both numbers when the machine has fewer GPUs). */
  static async create(opts: DeviceGroupOptions = {}): Promise<DeviceGroup> {
    const tp = opts.tensorParallel ?? 1;
    checkCount("tensorParallel", tp);
    const count = opts.devices ?? tp;
    checkCount("devices", count);
    if (opts.threads !== undefined) checkCount("threads", opts.threads);
    if ((opts.kind ?? "cpu") === "cuda") {
      // Device d is GPU d; the split LLM's ranks all-reduce through NCCL.
      const cuda = await import("./cuda.ts");
      // One device: the GPU's own create error says what is wrong (driver, no GPU).
      const shortage = count > 1 ? gpuShortage(count, tp, cuda.cudaDevices()) : null;
      if (shortage) throw new BackendError("group", 4, shortage);
      const devices: CudaBackend[] = [];
      try {
        for (let d = 0; d < count; d++) devices.push(cuda.CudaBackend.create({ device: d }));
        return new DeviceGroup(devices, tp, tp > 1 ? new NcclAllReduce(devices.slice(0, tp)) : undefined);
      } catch (e) {
        for (const d of devices) d.close();
        throw e;
      }
    }
    // One device keeps the backend's own default (one thread per core).
    const threads = opts.threads ?? (count === 1 ? undefined : Math.max(1, Math.floor(navigator.hardwareConcurrency / count)));
    return new DeviceGroup(Array.from({ length: count }, () => CpuBackend.create({ threads })), tp);
  }

  /** The rank-`rank` part of the weight at (file, offset, bytes): see the file comment. */
  weights(file: MappedFile, offset: number, bytes: number, shard: Shard): Ptr {
    const problem = shardProblem(shard);
    if (problem) throw new BackendError("weights", 1, `cannot split over ${shard.size} devices: ${problem}`);
    if (bytes !== dtypeBytes(shard.dtype, shard.rows * shard.cols)) {
      throw new BackendError("weights", 1, `${bytes} bytes is not a ${DTYPE_NAMES[shard.dtype]} [${shard.rows}, ${shard.cols}] tensor`);
    }
    const device = this.devices[shard.rank]!;
    const rowBytes = bytes / shard.rows;
    if (shard.split === "column") {
      const rows = shard.rows / shard.size;
      return device.weights(file, offset + shard.rank * rows * rowBytes, rows * rowBytes);
    }
    return this.rowSlice(file, offset, bytes, shard, rowBytes / shard.size);
  }

  /** Copies columns of rank shard.rank out of every row into a new buffer on its device. */
  private rowSlice(file: MappedFile, offset: number, bytes: number, shard: Shard, sliceBytes: number): Ptr {
    const key = `${offset} ${bytes} ${shard.rank} ${shard.size}`;
    let perFile = this.copies.get(file);
    if (!perFile) this.copies.set(file, (perFile = new Map()));
    const hit = perFile.get(key);
    if (hit !== undefined) return hit.buf.ptr;
    if (offset < 0 || offset + bytes > file.size) throw new BackendError("weights", 1, `range [${offset}, ${offset + bytes}) is outside ${file.path} (${file.size} bytes)`);
    const device = this.devices[shard.rank]!;
    const buf = device.alloc(shard.rows * sliceBytes);
    const slice = buf.host ? new Uint8Array(buf.host) : new Uint8Array(buf.bytes);
    const rowBytes = bytes / shard.rows;
    for (let r = 0; r < shard.rows; r++) {
      const from = offset + r * rowBytes + shard.rank * sliceBytes;
      slice.set(file.bytes.subarray(from, from + sliceBytes), r * sliceBytes);
    }
    if (!buf.host) device.upload(buf.ptr, slice);
    perFile.set(key, { rank: shard.rank, buf });
    return buf.ptr;
  }

  /** Frees the row-parallel copies made for rank `rank` from `files` (its model closes). */
  releaseWeights(files: readonly MappedFile[], rank: number): void {
    for (const file of files) {
      const perFile = this.copies.get(file);
      if (!perFile) continue;
      for (const [key, copy] of perFile) {
        if (copy.rank !== rank) continue;
        this.devices[rank]!.free(copy.buf);
        perFile.delete(key);
      }
    }
  }

  /** `bytes` bytes on each of the tensor-parallel ranks. */
  alloc(bytes: number): GroupBuffer {
    const bufs = this.devices.slice(0, this.tensorParallel).map((d) => d.alloc(bytes));
    const handle = { bytes, ptrs: bufs.map((b) => b.ptr) };
    this.owned.set(handle.ptrs[0]!, bufs);
    return handle;
  }

  free(buf: GroupBuffer): void {
    const bufs = this.owned.get(buf.ptrs[0]!);
    if (!bufs) throw new BackendError("free", 1, "not a live buffer of this group");
    this.owned.delete(buf.ptrs[0]!);
    bufs.forEach((b, r) => this.devices[r]!.free(b));
  }

  /** Sums a group buffer of f32 over the tensor-parallel ranks, in place. */
  allReduceSum(buf: GroupBuffer, count: number): void {
    if (count * 4 > buf.bytes) throw new BackendError("allReduceSum", 1, `${count} floats do not fit a ${buf.bytes}-byte buffer`);
    this.comm.allReduceSum(buf.ptrs, count);
  }

  /** Closes the communicator and every device (their buffers go with them). */
  close(): void {
    this.comm.close();
    this.owned.clear();
    for (const d of this.devices) d.close();
  }
}

/** Why a CUDA group of `devices` devices (the first `tensorParallel` holding the LLM)
 *  cannot open one GPU each when `found` are there, or null when it can. */
export function gpuShortage(devices: number, tensorParallel: number, found: CudaDevices): string | null {
  if (found.count >= devices) return null;
  const who = devices === tensorParallel ? `tensorParallel=${tensorParallel}` : `a group of ${devices} devices (tensorParallel=${tensorParallel}, the SSMs on a device of their own)`;
  const why = found.problem ? ` (${found.problem})` : "";
  return `${who} needs ${devices} CUDA GPUs, one per device, but this machine has ${found.count}${why}`;
}

function checkCount(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 1) throw new BackendError("group", 1, `${name} must be a positive integer, got ${v}`);
}

// Paged KV cache of one model: block bookkeeping (blocks.ts) plus the native storage
// the attention kernel reads through the block tables. Storage layout, as the ABI
// fixes it (ffi/specinfer.h): planes [layer][K, V], each [block][slot][kvHeads*headDim]
// elements of the cache dtype: f16 by default (half the memory of f32, as llama.cpp's
// default cache; K/V are rounded to f16 on write and attention accumulates in f32).
// Over the devices of a tensor-parallel model the planes split by KV heads: device d
// holds heads [d*H/D, (d+1)*H/D) in planes of its own, with its own copy of the block
// tables; the bookkeeping (which blocks a sequence has) is one, shared.

import { type Backend, type DeviceBuffer, DType, DTYPE_NAMES, dtypeBytes, type KVDType, type Ptr } from "../backend/backend";
import type { PagedKV } from "../model/batch";
import type { ModelConfig } from "../model/config";
import { BlockPool, BlockTables } from "./blocks";

export type { KVDType } from "../backend/backend";

export const DEFAULT_KV_DTYPE: KVDType = DType.F16;

/** The shape fields that size a cache (a ModelConfig has them). */
type KVShape = Pick<ModelConfig, "numLayers" | "numKvHeads" | "headDim">;

/** Bytes one cached token takes: K and V of every layer. Lets a caller turn a memory
 *  budget into a block count (budget / (bytesPerToken * blockSize)) before allocating. */
export function kvBytesPerToken(shape: KVShape, dtype: KVDType = DEFAULT_KV_DTYPE): number {
  checkKVDType(dtype);
  return 2 * shape.numLayers * dtypeBytes(dtype, shape.numKvHeads * shape.headDim);
}

function checkKVDType(dtype: DType): asserts dtype is KVDType {
  if (dtype !== DType.F32 && dtype !== DType.F16) {
    throw new Error(`KV cache: dtype ${DTYPE_NAMES[dtype] ?? dtype} is not supported, use F32 or F16`);
  }
}

export interface KVCacheOptions {
  numLayers: number;
  numKvHeads: number;
  headDim: number;
  /** Longest sequence (prompt + generation + one speculative tree) in slots. */
  maxSeqLen: number;
  /** Sequences that can be open at once. */
  maxSeqs: number;
  blockSize?: number;
  /** Pool size in blocks; default: enough for maxSeqs full-length sequences. */
  numBlocks?: number;
  /** Alternative to numBlocks: a memory budget for K and V of all layers. */
  memoryBytes?: number;
  /** Element type of the stored K/V; default F16. */
  dtype?: KVDType;
}

/** One device's share: planes of its KV heads and its copy of the index. */
class KVShard implements PagedKV {
  readonly devices = 1;
  readonly storage: DeviceBuffer;
  readonly tablesDevice: DeviceBuffer;
  readonly committedDevice: DeviceBuffer;
  readonly moveDevice: DeviceBuffer;

  constructor(readonly backend: Backend, private readonly cache: KVCache, storageBytes: number) {
    this.storage = backend.alloc(storageBytes);
    this.tablesDevice = backend.alloc(cache.tables.tables.byteLength);
    this.committedDevice = backend.alloc(cache.tables.committedLengths.byteLength);
    this.moveDevice = backend.alloc(2 * cache.tables.maxSlots * 4);
  }

  get dtype(): KVDType {
    return this.cache.dtype;
  }

  get maxBlocksPerSeq(): number {
    return this.cache.maxBlocksPerSeq;
  }

  get blockSize(): number {
    return this.cache.blockSize;
  }

  get blockTablesPtr(): Ptr {
    return this.tablesDevice.ptr;
  }

  get committedPtr(): Ptr {
    return this.committedDevice.ptr;
  }

  kPlane(layer: number): Ptr {
    return this.planeAt(2 * layer);
  }

  vPlane(layer: number): Ptr {
    return this.planeAt(2 * layer + 1);
  }

  private planeAt(plane: number): Ptr {
    return this.storage.ptr + dtypeBytes(this.dtype, plane * this.cache.planeStride);
  }

  capacity(row: number): number {
    return this.cache.capacity(row);
  }

  syncIndex(): void {
    this.backend.upload(this.tablesDevice.ptr, this.cache.tables.tables);
    this.backend.upload(this.committedDevice.ptr, this.cache.tables.committedLengths);
  }

  shard(rank: number): PagedKV {
    if (rank !== 0) throw new Error(`KV cache: device ${rank} of a 1-device part`);
    return this;
  }

  /** Moves uncommitted rows `src` to `dst` (slots) of sequence `row`, in every plane. */
  move(row: number, idx: Int32Array, planes: number): void {
    const n = idx.length / 2;
    const c = this.cache;
    this.backend.upload(this.moveDevice.ptr, idx);
    this.backend.upload(this.tablesDevice.ptr, c.tables.tables);
    const table = this.tablesDevice.ptr + row * c.maxBlocksPerSeq * 4;
    this.backend.kvMove(
      this.storage.ptr, this.dtype, planes, c.planeStride, c.rowElements, table, c.blockSize,
      this.moveDevice.ptr, this.moveDevice.ptr + n * 4, n,
    );
  }

  close(): void {
    for (const buf of [this.storage, this.tablesDevice, this.committedDevice, this.moveDevice]) this.backend.free(buf);
  }
}

export class KVCache implements PagedKV {
  readonly tables: BlockTables;
  readonly blockSize: number;
  readonly maxBlocksPerSeq: number;
  readonly dtype: KVDType;
  /** Bytes per cached token, K and V of all layers (kvBytesPerToken). */
  readonly bytesPerToken: number;
  /** Elements per cached token per plane (of one device's KV heads). */
  readonly rowElements: number;
  /** Elements (of dtype) between two planes. */
  readonly planeStride: number;
  private readonly numPlanes: number;
  private readonly parts: KVShard[];

  /** Several backends: the devices of a tensor-parallel model, over which the KV heads split. */
  constructor(backend: Backend | readonly Backend[], opts: KVCacheOptions) {
    const backends: readonly Backend[] = Array.isArray(backend) ? backend : [backend];
    if (backends.length < 1 || opts.numKvHeads % backends.length !== 0) {
      throw new Error(`KV cache: ${opts.numKvHeads} KV heads do not split over ${backends.length} devices`);
    }
    this.dtype = opts.dtype ?? DEFAULT_KV_DTYPE;
    checkKVDType(this.dtype);
    this.blockSize = opts.blockSize ?? 16;
    this.rowElements = (opts.numKvHeads / backends.length) * opts.headDim;
    this.maxBlocksPerSeq = Math.ceil(opts.maxSeqLen / this.blockSize);
    this.numPlanes = 2 * opts.numLayers;
    this.bytesPerToken = kvBytesPerToken(opts, this.dtype);
    const blockBytes = this.blockSize * this.bytesPerToken;
    const numBlocks =
      opts.numBlocks ??
      (opts.memoryBytes !== undefined ? Math.floor(opts.memoryBytes / blockBytes) : opts.maxSeqs * this.maxBlocksPerSeq);
    if (numBlocks < 1) throw new Error(`KV cache: a budget of ${opts.memoryBytes} bytes holds no ${blockBytes}-byte block`);
    this.tables = new BlockTables(new BlockPool(numBlocks), this.blockSize, opts.maxSeqs, this.maxBlocksPerSeq);
    this.planeStride = numBlocks * this.blockSize * this.rowElements;
    this.parts = [];
    try {
      for (const b of backends) this.parts.push(new KVShard(b, this, (numBlocks * blockBytes) / backends.length));
    } catch (e) {
      for (const p of this.parts) p.close();
      throw e;
    }
  }

  get totalBlocks(): number {
    return this.tables.pool.totalBlocks;
  }

  get freeBlocks(): number {
    return this.tables.pool.freeBlocks;
  }

  get usedBlocks(): number {
    return this.totalBlocks - this.freeBlocks;
  }

  /** K/V storage of all devices. */
  get bytes(): number {
    return this.parts.reduce((sum, p) => sum + p.storage.bytes, 0);
  }

  get devices(): number {
    return this.parts.length;
  }

  /** Device `rank`'s part (its KV heads); the cache itself is device 0's. */
  shard(rank: number): PagedKV {
    const part = this.parts[rank];
    if (!part) throw new Error(`KV cache: no device ${rank} (the cache is split over ${this.parts.length})`);
    return part;
  }

  kPlane(layer: number): Ptr {
    return this.parts[0]!.kPlane(layer);
  }

  vPlane(layer: number): Ptr {
    return this.parts[0]!.vPlane(layer);
  }

  /** Device copies of the block tables and committed lengths, refreshed by syncIndex. */
  get blockTablesPtr(): Ptr {
    return this.parts[0]!.blockTablesPtr;
  }

  get committedPtr(): Ptr {
    return this.parts[0]!.committedPtr;
  }

  /** Uploads the bookkeeping the kernels read (device 0's copy; each part syncs its
   *  own); called once before each forward. */
  syncIndex(): void {
    this.parts[0]!.syncIndex();
  }

  openSequence(): number {
    return this.tables.openRow();
  }

  closeSequence(row: number): void {
    this.tables.closeRow(row);
  }

  committed(row: number): number {
    return this.tables.committed(row);
  }

  capacity(row: number): number {
    return this.tables.capacity(row);
  }

  /** Makes room for `extra` uncommitted slots after the committed prefix. */
  reserve(row: number, extra: number): void {
    this.tables.reserve(row, extra);
  }

  /** Blocks reserve(row, extra) would take from the pool, without taking them. */
  blocksToReserve(row: number, extra: number): number {
    return this.tables.blocksToReserve(row, extra);
  }

  /** Keeps the uncommitted slots `keptSlots` (increasing; e.g. a verified tree path)
   *  as the next committed positions and drops every other uncommitted slot. */
  commit(row: number, keptSlots: ArrayLike<number>): void {
    const base = this.tables.committed(row);
    const src: number[] = [];
    const dst: number[] = [];
    for (let i = 0; i < keptSlots.length; i++) {
      const from = keptSlots[i];
      if (from < base + i || (i > 0 && from <= keptSlots[i - 1])) {
        throw new Error(`KV commit: kept slots must be increasing and uncommitted, got ${Array.from(keptSlots).join(",")} after ${base}`);
      }
      if (from >= this.tables.capacity(row)) throw new Error(`KV commit: slot ${from} was never reserved`);
      if (from !== base + i) {
        src.push(from);
        dst.push(base + i);
      }
    }
    if (src.length > 0) {
      const idx = new Int32Array(2 * src.length);
      idx.set(src, 0);
      idx.set(dst, src.length);
      for (const p of this.parts) p.move(row, idx, this.numPlanes);
    }
    this.tables.setCommitted(row, base + keptSlots.length);
  }

  /** Commits the next `count` uncommitted slots in place, keeping later reserved slots. */
  commitPrefix(row: number, count: number): void {
    this.tables.advance(row, count);
  }

  close(): void {
    for (const p of this.parts) p.close();
  }
}

/** A KV cache shaped for a model: its layers, KV heads and head size (split over its
 *  devices when it is tensor-parallel), its context length unless `maxSeqLen` says otherwise. */
export function createKVCache(
  model: { readonly backend: Backend; readonly shards?: readonly Backend[]; readonly config: ModelConfig },
  opts: { maxSeqs: number; maxSeqLen?: number; blockSize?: number; memoryBytes?: number; numBlocks?: number; dtype?: KVDType },
): KVCache {
  const c = model.config;
  return new KVCache(model.shards ?? model.backend, {
    numLayers: c.numLayers,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    maxSeqLen: opts.maxSeqLen ?? c.maxPositionEmbeddings,
    maxSeqs: opts.maxSeqs,
    blockSize: opts.blockSize,
    memoryBytes: opts.memoryBytes,
    numBlocks: opts.numBlocks,
    dtype: opts.dtype,
  });
}

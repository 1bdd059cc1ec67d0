// Paged KV cache of one model: block bookkeeping (blocks.ts) plus the native storage
// the attention kernel reads through the block tables. Storage layout, as the ABI
// fixes it (ffi/specinfer.h): planes [layer][K, V], each [block][slot][kvHeads*headDim]
// elements of the cache dtype: f16 by default (half the memory of f32, as llama.cpp's
// default cache; K/V are rounded to f16 on write and attention accumulates in f32).

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

export class KVCache implements PagedKV {
  readonly tables: BlockTables;
  readonly blockSize: number;
  readonly maxBlocksPerSeq: number;
  readonly dtype: KVDType;
  /** Bytes per cached token, K and V of all layers (kvBytesPerToken). */
  readonly bytesPerToken: number;
  /** Elements per cached token per plane. */
  readonly rowElements: number;
  /** Elements (of dtype) between two planes. */
  readonly planeStride: number;
  private readonly storage: DeviceBuffer;
  private readonly tablesDevice: DeviceBuffer;
  private readonly committedDevice: DeviceBuffer;
  private readonly moveDevice: DeviceBuffer;
  private readonly numPlanes: number;

  constructor(private readonly backend: Backend, opts: KVCacheOptions) {
    this.dtype = opts.dtype ?? DEFAULT_KV_DTYPE;
    checkKVDType(this.dtype);
    this.blockSize = opts.blockSize ?? 16;
    this.rowElements = opts.numKvHeads * opts.headDim;
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
    this.storage = backend.alloc(numBlocks * blockBytes);
    this.tablesDevice = backend.alloc(this.tables.tables.byteLength);
    this.committedDevice = backend.alloc(this.tables.committedLengths.byteLength);
    this.moveDevice = backend.alloc(2 * this.tables.maxSlots * 4);
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

  get bytes(): number {
    return this.storage.bytes;
  }

  kPlane(layer: number): Ptr {
    return this.planeAt(2 * layer);
  }

  vPlane(layer: number): Ptr {
    return this.planeAt(2 * layer + 1);
  }

  private planeAt(plane: number): Ptr {
    return this.storage.ptr + dtypeBytes(this.dtype, plane * this.planeStride);
  }

  /** Device copies of the block tables and committed lengths, refreshed by syncIndex. */
  get blockTablesPtr(): Ptr {
    return this.tablesDevice.ptr;
  }

  get committedPtr(): Ptr {
    return this.committedDevice.ptr;
  }

  /** Uploads the bookkeeping the kernels read; called once before each forward. */
  syncIndex(): void {
    this.backend.upload(this.tablesDevice.ptr, this.tables.tables);
    this.backend.upload(this.committedDevice.ptr, this.tables.committedLengths);
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
      this.backend.upload(this.moveDevice.ptr, idx);
      this.backend.upload(this.tablesDevice.ptr, this.tables.tables);
      const table = this.tablesDevice.ptr + row * this.maxBlocksPerSeq * 4;
      this.backend.kvMove(
        this.storage.ptr, this.dtype, this.numPlanes, this.planeStride, this.rowElements, table, this.blockSize,
        this.moveDevice.ptr, this.moveDevice.ptr + src.length * 4, src.length,
      );
    }
    this.tables.setCommitted(row, base + keptSlots.length);
  }

  /** Commits the next `count` uncommitted slots in place, keeping later reserved slots. */
  commitPrefix(row: number, count: number): void {
    this.tables.advance(row, count);
  }

  close(): void {
    for (const buf of [this.storage, this.tablesDevice, this.committedDevice, this.moveDevice]) this.backend.free(buf);
  }
}

/** A KV cache shaped for a model: its layers, KV heads and head size, its context
 *  length unless `maxSeqLen` says otherwise. */
export function createKVCache(
  model: { readonly backend: Backend; readonly config: ModelConfig },
  opts: { maxSeqs: number; maxSeqLen?: number; blockSize?: number; memoryBytes?: number; numBlocks?: number; dtype?: KVDType },
): KVCache {
  const c = model.config;
  return new KVCache(model.backend, {
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

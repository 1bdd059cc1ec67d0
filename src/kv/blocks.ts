// Paged KV bookkeeping in plain TypeScript: a pool of fixed-size blocks and one block
// table per sequence row. No memory is touched here; KVCache (cache.ts) owns storage.

export class KVCacheFullError extends Error {
  constructor(needed: number, free: number) {
    super(`KV cache full: need ${needed} more block(s), ${free} free`);
    this.name = "KVCacheFullError";
  }
}

/** Free list of block ids; lowest ids are handed out first so tests can name them. */
export class BlockPool {
  private readonly freeIds: number[];

  constructor(readonly totalBlocks: number) {
    if (!Number.isInteger(totalBlocks) || totalBlocks <= 0) throw new Error(`BlockPool: totalBlocks must be a positive integer, got ${totalBlocks}`);
    // Stack with block 0 on top.
    this.freeIds = Array.from({ length: totalBlocks }, (_, i) => totalBlocks - 1 - i);
  }

  get freeBlocks(): number {
    return this.freeIds.length;
  }

  allocate(count: number): number[] {
    if (count > this.freeIds.length) throw new KVCacheFullError(count, this.freeIds.length);
    const ids: number[] = [];
    for (let i = 0; i < count; i++) ids.push(this.freeIds.pop()!);
    return ids;
  }

  release(ids: readonly number[]): void {
    for (let i = ids.length - 1; i >= 0; i--) this.freeIds.push(ids[i]);
  }
}

interface SequenceState {
  blocks: number[];
  committed: number;
}

/** Block tables of all sequence rows, flattened the way the attention kernel reads
 *  them: `tables[row * maxBlocksPerSeq + b]`. */
export class BlockTables {
  readonly tables: Int32Array;
  readonly committedLengths: Int32Array;
  private readonly rows: (SequenceState | null)[];

  constructor(
    readonly pool: BlockPool,
    readonly blockSize: number,
    readonly maxSeqs: number,
    readonly maxBlocksPerSeq: number,
  ) {
    this.tables = new Int32Array(maxSeqs * maxBlocksPerSeq).fill(-1);
    this.committedLengths = new Int32Array(maxSeqs);
    this.rows = new Array(maxSeqs).fill(null);
  }

  /** Capacity of one sequence in slots. */
  get maxSlots(): number {
    return this.maxBlocksPerSeq * this.blockSize;
  }

  get activeRows(): number {
    return this.rows.filter((r) => r !== null).length;
  }

  openRow(): number {
    const row = this.rows.indexOf(null);
    if (row < 0) throw new Error(`KV cache: all ${this.maxSeqs} sequence rows are in use`);
    this.rows[row] = { blocks: [], committed: 0 };
    this.committedLengths[row] = 0;
    return row;
  }

  committed(row: number): number {
    return this.state(row).committed;
  }

  blocksOf(row: number): readonly number[] {
    return this.state(row).blocks;
  }

  /** Blocks reserve(row, extra) would take from the pool (0 when the row already has
   *  them); takes none. Throws as reserve does when the row cannot hold the slots. */
  blocksToReserve(row: number, extra: number): number {
    const s = this.state(row);
    if (!Number.isInteger(extra) || extra < 0) throw new Error(`KV cache: extra slots must be a non-negative integer, got ${extra}`);
    const slots = s.committed + extra;
    if (slots > this.maxSlots) throw new Error(`KV cache: sequence needs ${slots} slots, the limit is ${this.maxSlots}`);
    return Math.max(0, Math.ceil(slots / this.blockSize) - s.blocks.length);
  }

  /** Makes slots [0, committed + extra) of `row` writable, allocating blocks. */
  reserve(row: number, extra: number): void {
    const need = this.blocksToReserve(row, extra);
    if (need === 0) return;
    const s = this.state(row);
    const ids = this.pool.allocate(need);
    for (const id of ids) {
      this.tables[row * this.maxBlocksPerSeq + s.blocks.length] = id;
      s.blocks.push(id);
    }
  }

  /** Slots currently backed by blocks. */
  capacity(row: number): number {
    return this.state(row).blocks.length * this.blockSize;
  }

  /** Sets the committed length to `length` and returns blocks past it to the pool. */
  setCommitted(row: number, length: number): void {
    const s = this.state(row);
    if (length < 0 || length > this.capacity(row)) throw new Error(`KV cache: cannot commit ${length} slots, row ${row} has ${this.capacity(row)}`);
    s.committed = length;
    this.committedLengths[row] = length;
    this.shrinkTo(row, Math.ceil(length / this.blockSize));
  }

  /** Commits the next `count` uncommitted slots and keeps every reserved block, so
   *  slots past them (e.g. a tree's root written in the same pass) stay valid. */
  advance(row: number, count: number): void {
    const s = this.state(row);
    if (count < 0 || s.committed + count > this.capacity(row)) throw new Error(`KV cache: cannot commit ${count} more slots, row ${row} has ${this.capacity(row) - s.committed} reserved`);
    s.committed += count;
    this.committedLengths[row] = s.committed;
  }

  closeRow(row: number): void {
    this.shrinkTo(row, 0);
    this.rows[row] = null;
    this.committedLengths[row] = 0;
  }

  private shrinkTo(row: number, keepBlocks: number): void {
    const s = this.state(row);
    if (s.blocks.length <= keepBlocks) return;
    const dropped = s.blocks.splice(keepBlocks);
    this.tables.fill(-1, row * this.maxBlocksPerSeq + keepBlocks, (row + 1) * this.maxBlocksPerSeq);
    this.pool.release(dropped);
  }

  private state(row: number): SequenceState {
    const s = this.rows[row];
    if (!s) throw new Error(`KV cache: sequence row ${row} is not open`);
    return s;
  }
}

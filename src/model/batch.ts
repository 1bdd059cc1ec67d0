// TokenBatch: the one shape of every forward pass (DESIGN.md "The one data path").
// A prefill chunk is a chain, a decode step a chain of one, a token tree a tree.

import type { KVDType } from "../backend/backend";

export interface TokenBatch {
  /** Number of tokens. */
  n: number;
  tokens: Int32Array;
  /** Absolute position: prefix length + depth in the tree. */
  positions: Int32Array;
  /** KV-cache sequence row each token belongs to. */
  seq: Int32Array;
  /** Logical slot its K/V is written to: committed length of its row + index among
   *  that row's batch tokens. */
  slot: Int32Array;
  /** Words per ancestor mask (each covers 32 batch tokens of the same row). */
  words: number;
  /** ancestors[i * words + (j >> 5)] bit (j & 31): token i attends to the j-th batch
   *  token of its row (itself included). */
  ancestors: Uint32Array;
  /** Which tokens need logits, in the order the logits rows come back. */
  logitRows: Int32Array;
}

/** What a forward needs of a paged KV cache (src/kv/cache.ts implements it): device
 *  addresses of the planes and the block tables, and which slots are reserved. */
export interface PagedKV {
  /** Element type of the K/V planes. */
  readonly dtype: KVDType;
  readonly maxBlocksPerSeq: number;
  readonly blockSize: number;
  readonly blockTablesPtr: number;
  readonly committedPtr: number;
  kPlane(layer: number): number;
  vPlane(layer: number): number;
  /** Slots of `row` backed by blocks. */
  capacity(row: number): number;
  /** Uploads the block tables and committed lengths before a forward. */
  syncIndex(): void;
  /** Devices the cache is split over by KV heads (tensor parallelism); 1 unsplit. */
  readonly devices: number;
  /** Device `rank`'s part: its planes and its copy of the index (itself when unsplit). */
  shard(rank: number): PagedKV;
}

/** Builder for batches of chains and trees over several sequences. */
export class BatchBuilder {
  private tokens: number[] = [];
  private positions: number[] = [];
  private seq: number[] = [];
  private slot: number[] = [];
  private masks: Uint32Array[] = [];
  private logitRows: number[] = [];
  /** Per token: its index j among its row's uncommitted tokens (slot = committed + j). */
  private index: number[] = [];
  /** Next free index per row, for add(). */
  private nextIndex = new Map<number, number>();

  constructor(private readonly words: number) {}

  /** Adds one token of sequence row `seqRow` whose cache holds `committed` slots, as the
   *  row's next uncommitted token. `parent` is the batch index of its parent in this
   *  batch (-1: it attends to the committed prefix only). Returns its batch index. */
  add(seqRow: number, committed: number, token: number, position: number, parent: number, wantLogits: boolean): number {
    const j = this.nextIndex.get(seqRow) ?? 0;
    this.nextIndex.set(seqRow, j + 1);
    if (parent >= 0 && this.seq[parent] !== seqRow) throw new Error("batch: parent belongs to another sequence");
    const mask = new Uint32Array(this.words);
    if (parent >= 0) mask.set(this.masks[parent]);
    return this.addAt(seqRow, committed, token, position, j, mask, wantLogits);
  }

  /** Adds a token at uncommitted index `j` of its row (slot committed + j) that attends
   *  to the row's uncommitted tokens whose indices are in `ancestors` (plus itself).
   *  Those may have been written by an earlier batch: drafters grow trees this way. */
  addNode(seqRow: number, committed: number, token: number, position: number, j: number, ancestors: Iterable<number>, wantLogits: boolean): number {
    const mask = new Uint32Array(this.words);
    for (const a of ancestors) {
      if (a >= this.words * 32) throw new Error(`batch: ancestor index ${a} exceeds ${this.words * 32}`);
      mask[a >> 5] |= 1 << (a & 31);
    }
    return this.addAt(seqRow, committed, token, position, j, mask, wantLogits);
  }

  private addAt(seqRow: number, committed: number, token: number, position: number, j: number, mask: Uint32Array, wantLogits: boolean): number {
    if (j >= this.words * 32) throw new Error(`batch: more than ${this.words * 32} uncommitted tokens for sequence row ${seqRow}`);
    mask[j >> 5] |= 1 << (j & 31);
    const i = this.tokens.length;
    this.tokens.push(token);
    this.positions.push(position);
    this.seq.push(seqRow);
    this.slot.push(committed + j);
    this.index.push(j);
    this.masks.push(mask);
    if (wantLogits) this.logitRows.push(i);
    return i;
  }

  /** Adds a chain (prefill chunk or decode token) as the row's next tokens. */
  addChain(seqRow: number, committed: number, tokens: ArrayLike<number>, startPosition: number, logits: "all" | "last" | "none"): number {
    let parent = -1;
    for (let t = 0; t < tokens.length; t++) {
      const want = logits === "all" || (logits === "last" && t === tokens.length - 1);
      parent = this.add(seqRow, committed, tokens[t], startPosition + t, parent, want);
    }
    return parent;
  }

  get size(): number {
    return this.tokens.length;
  }

  get logitCount(): number {
    return this.logitRows.length;
  }

  /** The batch, with masks cut to the words the highest index needs (the attention
   *  kernel scans every word). */
  build(): TokenBatch {
    const n = this.tokens.length;
    const words = Math.max(1, Math.ceil((Math.max(0, ...this.index) + 1) / 32));
    const ancestors = new Uint32Array(n * words);
    for (let i = 0; i < n; i++) ancestors.set(this.masks[i].subarray(0, words), i * words);
    return {
      n,
      tokens: Int32Array.from(this.tokens),
      positions: Int32Array.from(this.positions),
      seq: Int32Array.from(this.seq),
      slot: Int32Array.from(this.slot),
      words,
      ancestors,
      logitRows: Int32Array.from(this.logitRows),
    };
  }
}

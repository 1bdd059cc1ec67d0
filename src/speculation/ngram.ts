// Prompt lookup: the last n tokens occurred earlier in the sequence, so propose what
// followed them then. No model, no distribution (q = null): verification treats the
// proposals as point masses.

import type { DraftTree } from "./tree.ts";

export interface NgramOptions {
  /** Longest suffix matched first (default 3). */
  maxN: number;
  /** Shortest suffix tried (default 1). */
  minN: number;
  /** Tokens proposed per continuation (default 8). */
  length: number;
  /** Distinct continuations proposed as branches of one tree (default 1: a chain). */
  branches: number;
}

/** Occurrences looked at per draft, most recent first, when collecting branches. */
const MAX_OCCURRENCES_SCANNED = 64;

function ngramKey(tokens: ArrayLike<number>, end: number, n: number): string {
  let key = "";
  for (let i = end - n; i < end; i++) key += `${tokens[i]},`;
  return key;
}

/** One per sequence: push tokens as they are committed, draft at every step. The
 *  index (n-gram -> positions that followed it) grows incrementally, so a draft
 *  costs O(maxN + branches * length), not a scan of the context. */
export class NgramDrafter {
  readonly options: NgramOptions;
  private readonly tokens: number[] = [];
  /** follows[n - minN]: n-gram key -> indices of the token right after each occurrence, ascending. */
  private readonly follows: Map<string, number[]>[] = [];

  constructor(options: Partial<NgramOptions> = {}) {
    this.options = { maxN: 3, minN: 1, length: 8, branches: 1, ...options };
    const { maxN, minN, length, branches } = this.options;
    for (const [name, value] of Object.entries({ maxN, minN, length, branches })) {
      if (!Number.isInteger(value) || value < 1) throw new Error(`ngram: ${name} must be a positive integer, got ${value}`);
    }
    if (minN > maxN) throw new Error(`ngram: minN (${minN}) exceeds maxN (${maxN})`);
    for (let n = minN; n <= maxN; n++) this.follows.push(new Map());
  }

  get length(): number {
    return this.tokens.length;
  }

  push(tokens: ArrayLike<number>): void {
    const { minN, maxN } = this.options;
    for (let t = 0; t < tokens.length; t++) {
      this.tokens.push(tokens[t]);
      const end = this.tokens.length;
      for (let n = minN; n <= Math.min(maxN, end); n++) {
        const key = ngramKey(this.tokens, end, n);
        const index = this.follows[n - minN];
        const positions = index.get(key);
        if (positions) positions.push(end);
        else index.set(key, [end]);
      }
    }
  }

  /** Continuations of the longest suffix seen before, most recent occurrence first,
   *  merged into a trie; an empty tree when nothing matches. */
  draft(): DraftTree {
    const { minN, maxN, length, branches } = this.options;
    const end = this.tokens.length;
    const tokens: number[] = [];
    const parents: number[] = [];
    const childOf = new Map<string, number>(); // `${parent}:${token}` -> node
    for (let n = Math.min(maxN, end); n >= minN; n--) {
      const positions = this.follows[n - minN].get(ngramKey(this.tokens, end, n));
      if (!positions) continue;
      let added = 0;
      const oldest = Math.max(0, positions.length - MAX_OCCURRENCES_SCANNED);
      for (let k = positions.length - 1; k >= oldest && added < branches; k--) {
        const start = positions[k];
        if (start >= end) continue; // the suffix itself: nothing follows yet
        let parent = -1;
        let isNew = false;
        for (let i = start; i < Math.min(start + length, end); i++) {
          const edge = `${parent}:${this.tokens[i]}`;
          let node = childOf.get(edge);
          if (node === undefined) {
            node = tokens.length;
            tokens.push(this.tokens[i]);
            parents.push(parent);
            childOf.set(edge, node);
            isNew = true;
          }
          parent = node;
        }
        if (isNew) added++;
      }
      if (added > 0) break;
    }
    return { tokens: Int32Array.from(tokens), parents: Int32Array.from(parents), sampled: false };
  }
}

/** One-shot prompt lookup over a whole sequence (builds the index each call). */
export function promptLookup(sequence: ArrayLike<number>, options: Partial<NgramOptions> = {}): DraftTree {
  const drafter = new NgramDrafter(options);
  drafter.push(sequence);
  return drafter.draft();
}

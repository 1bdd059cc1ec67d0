// The merge loop shared by SentencePiece BPE and byte-level BPE: repeatedly merge the
// adjacent pair with the best priority (lowest value; leftmost on ties) until no
// adjacent pair is mergeable. A binary heap keeps it O(n log n) per word.

/** Priority of merging `left` + `right` (lower merges first), or undefined if the pair
 *  never merges. */
export type PairPriority = (left: string, right: string) => number | undefined;

interface Candidate {
  priority: number;
  left: number; // symbol index; also the symbol's order in the word, the tie-break
  right: number;
  leftText: string;
  rightText: string;
}

function before(a: Candidate, b: Candidate): boolean {
  return a.priority < b.priority || (a.priority === b.priority && a.left < b.left);
}

class CandidateHeap {
  private readonly items: Candidate[] = [];

  get size(): number {
    return this.items.length;
  }

  push(c: Candidate): void {
    const items = this.items;
    items.push(c);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!before(items[i], items[parent])) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  pop(): Candidate {
    const items = this.items;
    const top = items[0];
    const last = items.pop()!;
    if (items.length > 0) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < items.length && before(items[l], items[best])) best = l;
        if (r < items.length && before(items[r], items[best])) best = r;
        if (best === i) break;
        [items[i], items[best]] = [items[best], items[i]];
        i = best;
      }
    }
    return top;
  }
}

/** Merges `symbols` (the word's initial pieces) and returns the final pieces. */
export function mergeSymbols(symbols: string[], priority: PairPriority): string[] {
  const n = symbols.length;
  if (n < 2) return symbols;
  const text = symbols.slice();
  const next = Array.from({ length: n }, (_, i) => (i + 1 < n ? i + 1 : -1));
  const prev = Array.from({ length: n }, (_, i) => i - 1);
  const alive = new Array<boolean>(n).fill(true);
  const heap = new CandidateHeap();

  const consider = (left: number, right: number) => {
    if (left < 0 || right < 0) return;
    const p = priority(text[left], text[right]);
    if (p !== undefined) {
      heap.push({ priority: p, left, right, leftText: text[left], rightText: text[right] });
    }
  };
  for (let i = 0; i + 1 < n; i++) consider(i, i + 1);

  while (heap.size > 0) {
    const c = heap.pop();
    // Stale when either side has merged with something else since it was queued.
    if (
      !alive[c.left] || !alive[c.right] || next[c.left] !== c.right ||
      text[c.left] !== c.leftText || text[c.right] !== c.rightText
    ) {
      continue;
    }
    text[c.left] = c.leftText + c.rightText;
    alive[c.right] = false;
    next[c.left] = next[c.right];
    if (next[c.right] >= 0) prev[next[c.right]] = c.left;
    consider(prev[c.left], c.left);
    consider(c.left, next[c.left]);
  }

  const out: string[] = [];
  for (let i = 0; i >= 0; i = next[i]) out.push(text[i]);
  return out;
}

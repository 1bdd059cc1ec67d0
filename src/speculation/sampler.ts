// One step's token decisions on the backend: every logits row is penalized, processed
// and picked (argmax, or the seeded draw uniformAt(seed, position)) by si_sample, and
// every token tree is walked greedily by si_tree_accept, so only token ids come back
// (and, for multi-step speculative sampling, the rows it visits). sampling.ts and
// verify.ts are the same rules in TypeScript: the tests' oracle.

import type { Backend, DeviceBuffer, Ptr } from "../backend/backend.ts";
import type { DeviceLogits } from "../model/causal-lm.ts";
import { readsContext, type SamplingParams } from "./sampling.ts";
import type { TokenTree } from "./tree.ts";

/** si_sampling_field (ffi/specinfer.h): the doubles of one row's parameters. */
const FIELDS = 9;

/** One logits row to pick a token from. */
export interface SampleRow {
  params: SamplingParams;
  /** Token -> occurrences in the context before the row's token (its penalties read
   *  them); null when the params read no context. */
  counts: ReadonlyMap<number, number> | null;
  seed: number;
  /** The position of the token drawn (the draw is uniformAt(seed, position)). */
  position: number;
}

/** A token tree over consecutive rows: row 0 is the root, row r > 0 a node whose parent
 *  is row parents[r] (< r) of the same tree. */
export interface TreeRows {
  parents: Int32Array;
  tokens: Int32Array;
}

export interface TreeOutcome {
  /** Rows (within the tree) of the accepted nodes, in path order. */
  accepted: number[];
  /** The LLM's token after the accepted path; -1: that row had no mass. */
  bonus: number;
}

/** Token -> count for `tokens`. */
export function tokenCounts(tokens: ArrayLike<number>): Map<number, number> {
  const counts = new Map<number, number>();
  for (let i = 0; i < tokens.length; i++) counts.set(tokens[i], (counts.get(tokens[i]) ?? 0) + 1);
  return counts;
}

/** `counts` with one more `token`. */
export function withToken(counts: ReadonlyMap<number, number>, token: number): Map<number, number> {
  const next = new Map(counts);
  next.set(token, (next.get(token) ?? 0) + 1);
  return next;
}

/** The rows of one request's step: its root (the last token's logits) then, with a tree,
 *  node k at row 1 + k, whose context is `context` plus the path to it (inclusive) and
 *  whose draw is at `context.length` + its depth. */
export function requestRows(
  params: SamplingParams, seed: number, context: readonly number[], tree: TokenTree | null,
): { rows: SampleRow[]; tree: TreeRows } {
  const size = tree?.size ?? 0;
  const counts = readsContext(params) ? tokenCounts(context) : null;
  const position = context.length;
  const rows: SampleRow[] = [{ params, counts, seed, position }];
  const parents = new Int32Array(1 + size);
  const tokens = new Int32Array(1 + size);
  parents[0] = -1;
  for (let k = 0; k < size; k++) {
    const parent = tree!.parents[k];
    parents[1 + k] = parent + 1;
    tokens[1 + k] = tree!.tokens[k];
    const before = parent < 0 ? counts : rows[1 + parent].counts;
    rows.push({ params, counts: before ? withToken(before, tree!.tokens[k]) : null, seed, position: position + tree!.depths[k] });
  }
  return { rows, tree: { parents, tokens } };
}

/** Device buffers of one kind, grown on demand and reused across steps. */
class Scratch {
  private buf: DeviceBuffer | null = null;

  constructor(private readonly backend: Backend) {}

  /** A buffer of at least `bytes` bytes (contents not kept when it grows). */
  at(bytes: number): DeviceBuffer {
    if (!this.buf || this.buf.bytes < bytes) {
      if (this.buf) this.backend.free(this.buf);
      this.buf = this.backend.alloc(Math.max(64, bytes, this.buf ? this.buf.bytes * 2 : 0));
    }
    return this.buf;
  }

  free(): void {
    if (this.buf) this.backend.free(this.buf);
    this.buf = null;
  }
}

export class NativeSampler {
  private readonly scratch: Record<
    "logits" | "params" | "listStart" | "listToken" | "listCount" | "listBias" | "probs" | "picked" |
    "treeStart" | "parents" | "tokens" | "accepted" | "counts" | "bonus",
    Scratch
  >;
  private rows = 0;

  constructor(private readonly backend: Backend, readonly vocab: number) {
    const make = () => new Scratch(backend);
    this.scratch = {
      logits: make(), params: make(), listStart: make(), listToken: make(), listCount: make(), listBias: make(),
      probs: make(), picked: make(), treeStart: make(), parents: make(), tokens: make(), accepted: make(),
      counts: make(), bonus: make(),
    };
  }

  /** Picks one token per row of `logits` ([rows.length, vocab], row-major: a forward's
   *  rows on the backend, read there, or rows in host memory) and walks `trees`, which
   *  cover the rows in order. Returns one outcome per tree; the processed rows stay
   *  readable through probsRow until the next call. */
  step(logits: DeviceLogits | Float32Array, rows: SampleRow[], trees: TreeRows[]): TreeOutcome[] {
    const n = rows.length;
    const vocab = this.vocab;
    const have = logits instanceof Float32Array ? Math.floor(logits.length / vocab) : logits.rows;
    if (have < n) throw new Error(`sampler: ${n} rows of ${vocab} logits needed, got ${have}`);
    const covered = trees.reduce((sum, t) => sum + t.parents.length, 0);
    if (covered !== n) throw new Error(`sampler: the trees cover ${covered} rows, the step has ${n}`);
    this.rows = n;
    if (n === 0) return [];
    const be = this.backend;
    const s = this.scratch;

    const params = new Float64Array(n * FIELDS);
    const starts = new Int32Array(n + 1);
    const tokens: number[] = [];
    const counts: number[] = [];
    const bias: number[] = [];
    rows.forEach((row, r) => {
      params.set(paramFields(row), r * FIELDS);
      listEntries(row, vocab, tokens, counts, bias);
      starts[r + 1] = tokens.length;
    });
    const probs = s.probs.at(n * vocab * 4);
    const picked = s.picked.at(n * 4);
    const logitsPtr = logits instanceof Float32Array ? this.hostLogits(logits.subarray(0, n * vocab)) : logits.ptr;
    const paramsPtr = this.put(s.params, params);
    const startsPtr = this.put(s.listStart, starts);
    const listed = tokens.length;
    const listToken = listed ? this.put(s.listToken, Int32Array.from(tokens)) : 0;
    const listCount = listed ? this.put(s.listCount, Int32Array.from(counts)) : 0;
    const listBias = listed ? this.put(s.listBias, Float64Array.from(bias)) : 0;
    be.sample(logitsPtr, n, vocab, paramsPtr, startsPtr, listToken, listCount, listBias, probs.ptr, picked.ptr);

    const treeStart = new Int32Array(trees.length + 1);
    const parents = new Int32Array(n);
    const nodeTokens = new Int32Array(n);
    trees.forEach((t, i) => {
      parents.set(t.parents, treeStart[i]);
      nodeTokens.set(t.tokens, treeStart[i]);
      treeStart[i + 1] = treeStart[i] + t.parents.length;
    });
    const accepted = s.accepted.at(n * 4);
    const countsOut = s.counts.at(trees.length * 4);
    const bonusOut = s.bonus.at(trees.length * 4);
    be.treeAccept(
      trees.length, this.put(s.treeStart, treeStart), this.put(s.parents, parents), this.put(s.tokens, nodeTokens),
      picked.ptr, accepted.ptr, countsOut.ptr, bonusOut.ptr,
    );
    const acceptedHost = new Int32Array(n);
    const countsHost = new Int32Array(trees.length);
    const bonusHost = new Int32Array(trees.length);
    be.download(acceptedHost, accepted.ptr);
    be.download(countsHost, countsOut.ptr);
    be.download(bonusHost, bonusOut.ptr);
    return trees.map((_, i) => ({
      accepted: Array.from(acceptedHost.subarray(treeStart[i], treeStart[i] + countsHost[i])),
      bonus: bonusHost[i],
    }));
  }

  /** The distribution of sampled row `row` of the last step, as a copy the caller may
   *  modify (greedy rows have none). */
  probsRow(row: number): Float32Array {
    if (!(row >= 0 && row < this.rows)) throw new Error(`sampler: row ${row} is outside the last step's ${this.rows} rows`);
    const probs = this.scratch.probs.at(0);
    const out = new Float32Array(this.vocab);
    if (probs.host) out.set(new Float32Array(probs.host, row * this.vocab * 4, this.vocab));
    else this.backend.download(out, probs.ptr + row * this.vocab * 4);
    return out;
  }

  close(): void {
    for (const buf of Object.values(this.scratch)) buf.free();
  }

  /** Host logits' device address: the view itself where the backend can address host
   *  memory (CPU), else an uploaded copy. */
  private hostLogits(logits: Float32Array): Ptr {
    return this.backend.addressOf(logits) ?? this.put(this.scratch.logits, logits);
  }

  private put(scratch: Scratch, data: ArrayBufferView): Ptr {
    const buf = scratch.at(data.byteLength);
    this.backend.upload(buf.ptr, data);
    return buf.ptr;
  }
}

/** A row's si_sampling_field values. */
function paramFields(row: SampleRow): number[] {
  const p = row.params;
  return [
    p.temperature, p.topK, p.topP, p.minP, p.repetitionPenalty, p.presencePenalty ?? 0, p.frequencyPenalty ?? 0,
    row.seed, row.position,
  ];
}

/** Appends a row's listed tokens: its context counts (when its penalties read them) and
 *  its logit bias (tokens outside the vocabulary are ignored, as sampling.ts does). */
function listEntries(row: SampleRow, vocab: number, tokens: number[], counts: number[], bias: number[]): void {
  const at = new Map<number, number>();
  if (row.counts && readsContext(row.params)) {
    for (const [token, count] of row.counts) {
      at.set(token, tokens.length);
      tokens.push(token);
      counts.push(count);
      bias.push(0);
    }
  }
  for (const [token, value] of row.params.logitBias ?? []) {
    if (!(Number.isInteger(token) && token >= 0 && token < vocab)) continue;
    const i = at.get(token);
    if (i !== undefined) bias[i] = value;
    else {
      tokens.push(token);
      counts.push(0);
      bias.push(value);
    }
  }
}

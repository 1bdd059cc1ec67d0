// Verification: given the LLM's logits at the root and every node of a merged token
// tree, keep the branch the LLM itself would have produced.
//
// Greedy: follow the child equal to the LLM's argmax. Stochastic: multi-step
// speculative sampling. At a node with target p, the drafters' proposals x_1, x_2, ...
// are checked in order, each against the distribution r_j it was drawn from given
// everything checked before it: accept x_j with probability min(1, p(x_j) / r_j(x_j)),
// else p := norm(max(0, p - r_j)); when all are rejected, sample from what is left of
// p. Then P(output = y) = min(p, r_j)(y) + P(reject) * residual(y) = p(y) at every
// step, so the output is distributed as p whatever proposals follow. The r_j:
//   - a child its drafter sampled: q with that drafter's earlier draws at this node
//     removed and renormalized (drawing without replacement);
//   - a child chosen deterministically (top-k, greedy, n-gram): the point mass at it,
//     i.e. accept with probability p(x), else zero p(x) and renormalize;
//   - children of one node from several drafters: drafter after drafter. Drafters draw
//     independently, so drafter d's r_j is its own q minus its own earlier draws; a token
//     another drafter already proposed is checked again against the current p (and
//     leads to the same trie node when accepted).

import type { Rng } from "./rng.ts";
import { greedyToken, isGreedy, processLogits, readsContext, sample, sampleAt, type SamplingParams } from "./sampling.ts";
import { pathTo, type Draw, type TokenTree } from "./tree.ts";

export interface VerifyOptions {
  params: SamplingParams;
  /** Used when sampling (multi-step speculative sampling). */
  rng?: Rng;
  /** Sampling with a fixed draw per position instead: the uniform for the token after
   *  a node at depth d (0 = the root). The LLM's own sample at each position is then
   *  the token kept, and the child equal to it is followed, as in greedy: the output is
   *  the incremental one with the same draws, whatever the tree. */
  uniforms?: (depth: number) => number;
  /** Tokens before the tree (prompt + generated, the root token last): the repetition
   *  penalty's context. */
  context?: ArrayLike<number>;
}

export interface VerifyResult {
  /** Node ids along the accepted path, root excluded. */
  accepted: number[];
  /** The LLM's own token after the accepted path (correction or bonus). */
  bonusToken: number;
  /** Tokens to emit: the accepted nodes' tokens, then the bonus token. */
  tokens: number[];
  /** Per emitted token: true when it came from the draft. */
  acceptedFromDraft: boolean[];
}

/** Verifies `tree` against `logits`: (tree.size + 1) rows of `vocab` values, the root's
 *  row first, then node i's row at 1 + i (linearize's order). */
export function verify(tree: TokenTree, logits: Float32Array, vocab: number, options: VerifyOptions): VerifyResult {
  const rows = tree.size + 1;
  if (logits.length < rows * vocab) {
    throw new Error(`verify: ${rows} logits rows of ${vocab} needed, got ${logits.length} values`);
  }
  const { params, uniforms } = options;
  const rng = isGreedy(params) || uniforms ? undefined : options.rng;
  if (!isGreedy(params) && !rng && !uniforms) throw new Error("verify: sampling needs an rng or per-position uniforms");
  const penalizing = options.context !== undefined && readsContext(params);
  const history = penalizing ? Array.from(options.context!) : undefined;

  if (rng) {
    const target = (row: number) => {
      const context = history && row > 0 ? [...history, ...pathTo(tree.parents, row - 1).map((id) => tree.tokens[id])] : history;
      return processLogits(logits.subarray(row * vocab, (row + 1) * vocab), params, context);
    };
    return sampleTree(tree, target, rng);
  }
  const accepted: number[] = [];
  let node = -1;
  for (;;) {
    const row = logits.subarray((node + 1) * vocab, (node + 2) * vocab);
    const depth = node < 0 ? 0 : tree.depths[node];
    const token = isGreedy(params) ? greedyToken(row, params, history) : sampleAt(processLogits(row, params, history), uniforms!(depth));
    const next = tree.children[node + 1].find((child) => tree.tokens[child] === token) ?? -1;
    if (next < 0) return outcome(tree, accepted, token);
    accepted.push(next);
    history?.push(tree.tokens[next]);
    node = next;
  }
}

/** Multi-step speculative sampling down `tree`: `target(row)` is the LLM's processed
 *  distribution at the root (row 0) or node row - 1 given the path to it, as a fresh
 *  array (the step turns it into the residual). */
export function sampleTree(tree: TokenTree, target: (row: number) => Float32Array, rng: Rng): VerifyResult {
  const accepted: number[] = [];
  let node = -1;
  for (;;) {
    const step = speculativeSamplingStep(target(node + 1), tree.draws[node + 1], tree.tokens, rng);
    if (step.child < 0) return outcome(tree, accepted, step.token);
    accepted.push(step.child);
    node = step.child;
  }
}

/** The result of a walk that accepted `accepted` and ends with the LLM's `bonus`. */
export function outcome(tree: TokenTree, accepted: number[], bonus: number): VerifyResult {
  const tokens = accepted.map((id) => tree.tokens[id]);
  tokens.push(bonus);
  return { accepted, bonusToken: bonus, tokens, acceptedFromDraft: tokens.map((_, i) => i < accepted.length) };
}

export interface StepOutcome {
  /** Accepted child node id, or -1 when every proposal was rejected. */
  child: number;
  /** The token emitted: the accepted child's, or one drawn from the residual. */
  token: number;
}

/** Multi-step speculative sampling at one node: target `p` (processed LLM distribution,
 *  modified in place into the residual), proposals `draws` in order. */
export function speculativeSamplingStep(p: Float32Array, draws: Draw[], tokens: Int32Array, rng: Rng): StepOutcome {
  // Per sampled drafter: its q with its rejected draws removed, renormalized.
  const remaining = new Map<number, Float32Array>();
  for (const draw of draws) {
    const x = tokens[draw.child];
    if (!draw.sampled || !draw.q) {
      if (rng.next() < p[x]) return { child: draw.child, token: x };
      removeAndRenormalize(p, x);
      continue;
    }
    let r = remaining.get(draw.drafter);
    if (!r) {
      r = draw.q.slice();
      remaining.set(draw.drafter, r);
    }
    // r(x) > 0 for a token drawn from r; the guard keeps malformed input from dividing by 0.
    if (r[x] > 0 ? rng.next() * r[x] < p[x] : p[x] > 0) return { child: draw.child, token: x };
    subtractAndRenormalize(p, r);
    removeAndRenormalize(r, x);
  }
  return { child: -1, token: sample(p, rng) };
}

/** p := p without token x, renormalized (left as is if x held all the mass). */
function removeAndRenormalize(p: Float32Array, x: number): void {
  let rest = 0;
  for (let i = 0; i < p.length; i++) if (i !== x) rest += p[i];
  if (!(rest > 0)) return;
  p[x] = 0;
  for (let i = 0; i < p.length; i++) p[i] /= rest;
}

/** p := norm(max(0, p - r)). When r covers p entirely a rejection has probability 0,
 *  so reaching here means only rounding separates them: keep p. */
function subtractAndRenormalize(p: Float32Array, r: Float32Array): void {
  let total = 0;
  for (let i = 0; i < p.length; i++) total += Math.max(0, p[i] - r[i]);
  if (!(total > 1e-12)) return;
  for (let i = 0; i < p.length; i++) p[i] = Math.max(0, p[i] - r[i]) / total;
}

// Per-step sampling / verification cost of one request's 64-node token tree (65 logits
// rows): the TypeScript path (verify.ts over the rows, as the engine ran it before) vs
// the native path (NativeSampler: si_sample over every row + si_tree_accept), at vocab
// 32000 and 128256, CPU backend. Trees: a 64-node chain the LLM accepts whole (65 rows
// visited) and 8 branches of 8 of which the first is accepted (9 rows visited).
// Modes: greedy, sampled with top-p (per-position draws), sampled with top-k and penalties.
// JSON on stdout; `otherLoad` is the CPU other processes used meanwhile (cores).
//
//   npm run bench:sampling [-- --reps N --threads T]

import { CpuBackend } from "../src/backend/cpu.ts";
import { Rng, uniformAt } from "../src/speculation/rng.ts";
import { NativeSampler, requestRows } from "../src/speculation/sampler.ts";
import type { SamplingParams } from "../src/speculation/sampling.ts";
import { mergeTrees, type TokenTree } from "../src/speculation/tree.ts";
import { verify } from "../src/speculation/verify.ts";
import { loadavg, median, OtherLoad, round } from "./lib/measure.ts";

function flag(name: string, fallback: number): number {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? Number(process.argv[at + 1]) : fallback;
}

const reps = flag("reps", 7);
const threads = flag("threads", 2);

/** `branches` chains of `depth` nodes under the root; node tokens 1, 2, ... */
function treeOf(branches: number, depth: number): TokenTree {
  const tokens: number[] = [];
  const parents: number[] = [];
  for (let b = 0; b < branches; b++) {
    for (let d = 0; d < depth; d++) {
      parents.push(d === 0 ? -1 : tokens.length - 1);
      tokens.push(1 + b * depth + d);
    }
  }
  return mergeTrees([{ tokens: Int32Array.from(tokens), parents: Int32Array.from(parents), sampled: false }]);
}

/** Random logits in which every row of the first branch (and the root) peaks at its
 *  child's token, so greedy verification accepts that branch whole. */
function logitsFor(tree: TokenTree, vocab: number): Float32Array {
  const rows = tree.size + 1;
  const rng = new Rng(7);
  const logits = Float32Array.from({ length: rows * vocab }, () => 4 * (rng.next() - 0.5));
  const firstBranch = tree.children[0][0];
  for (let node = -1, next = firstBranch; next !== undefined; node = next, next = tree.children[next + 1][0]) {
    logits[(node + 1) * vocab + tree.tokens[next]] = 20;
  }
  return logits;
}

const MODES: Record<string, SamplingParams> = {
  greedy: { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 },
  "top-p 0.9": { temperature: 0.8, topK: 0, topP: 0.9, minP: 0, repetitionPenalty: 1 },
  "top-k 40 + penalties": { temperature: 0.8, topK: 40, topP: 1, minP: 0.05, repetitionPenalty: 1.1, presencePenalty: 0.5, frequencyPenalty: 0.2 },
};

function time(fn: () => void): number {
  fn(); // warm-up
  const ms: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    fn();
    ms.push(performance.now() - t0);
  }
  return median(ms);
}

const backend = CpuBackend.create({ threads });
const context = Array.from({ length: 256 }, (_, i) => (i * 131) % 1000);
const seed = 1234;
const results: unknown[] = [];
const load = new OtherLoad();
for (const vocab of [32000, 128256]) {
  const sampler = new NativeSampler(backend, vocab);
  for (const [shape, tree] of [["chain 64", treeOf(1, 64)], ["8 x 8", treeOf(8, 8)]] as const) {
    const logits = logitsFor(tree, vocab);
    for (const [mode, params] of Object.entries(MODES)) {
      const uniforms = params.temperature > 0 ? (depth: number) => uniformAt(seed, context.length + depth) : undefined;
      let tsAccepted = 0;
      let nativeAccepted = 0;
      const tsMs = time(() => {
        tsAccepted = verify(tree, logits, vocab, { params, context, uniforms }).accepted.length;
      });
      const nativeMs = time(() => {
        const step = requestRows(params, seed, context, tree);
        nativeAccepted = sampler.step(logits, step.rows, [step.tree])[0].accepted.length;
      });
      results.push({
        vocab, tree: shape, rows: tree.size + 1, mode, tsMs: round(tsMs), nativeMs: round(nativeMs),
        speedup: round(tsMs / nativeMs, 2), acceptedTs: tsAccepted, acceptedNative: nativeAccepted,
      });
    }
  }
  sampler.close();
}
const otherLoad = load.stop();
backend.close();
console.log(JSON.stringify({ bench: "sampling", threads, reps, loadavg: loadavg(), otherLoad, results }, null, 2));

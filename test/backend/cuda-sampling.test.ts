// si_sample and si_tree_accept on the GPU against the CPU library, through NativeSampler,
// on fresh random logits of realistic vocabularies. Runs only with SPECINFER_GPU=1 on a
// machine with a GPU; elsewhere each test is reported as skipped, the reason in its name.
//
//   SPECINFER_GPU=1 node_modules/.bin/bun test test/backend/cuda-sampling.test.ts --timeout 300000

import { afterAll, beforeAll, describe, expect } from "bun:test";
import { CpuBackend } from "../../src/backend/cpu.ts";
import { CudaBackend } from "../../src/backend/cuda.ts";
import { Rng, uniformAt } from "../../src/speculation/rng.ts";
import { NativeSampler, requestRows, type SampleRow } from "../../src/speculation/sampler.ts";
import type { SamplingParams } from "../../src/speculation/sampling.ts";
import { mergeTrees } from "../../src/speculation/tree.ts";
import { SEED } from "../helpers/random.ts";
import { GPU, gpuTest } from "../helpers/gpu.ts";


let cpu: CpuBackend;
let gpu: CudaBackend;
beforeAll(() => {
  if (!GPU) return;
  cpu = CpuBackend.create({ threads: 2 });
  gpu = CudaBackend.create({ checked: true });
});
afterAll(() => {
  cpu?.close();
  gpu?.close();
});

const MODES: SamplingParams[] = [
  { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1.2, logitBias: new Map([[3, 5]]) },
  { temperature: 0.7, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 },
  { temperature: 0.9, topK: 0, topP: 0.9, minP: 0.02, repetitionPenalty: 1, presencePenalty: 0.4 },
  { temperature: 1.1, topK: 40, topP: 0.95, minP: 0, repetitionPenalty: 1.1, frequencyPenalty: 0.3 },
];

/** Whether u lies within 1e-5 (relative) of a boundary of the CDF of `probs`. */
function nearBoundary(probs: Float32Array, u: number): boolean {
  let total = 0;
  for (const p of probs) total += p;
  let cumulative = 0;
  for (const p of probs) {
    cumulative += p;
    if (p > 0 && Math.abs(cumulative / total - u) < 1e-5) return true;
  }
  return false;
}

describe("GPU sampling equals the CPU library", () => {
  for (const vocab of [32000, 128256]) {
    gpuTest(`vocab ${vocab}: 64-node tree, every mode: same picks (but on CDF boundaries), same distributions, same accepted path`, () => {
      const rng = new Rng(SEED);
      const parents = Int32Array.from({ length: 64 }, (_, i) => (i < 8 ? -1 : Math.floor(rng.next() * i)));
      const tokens = Int32Array.from({ length: 64 }, () => Math.floor(rng.next() * vocab));
      const tree = mergeTrees([{ tokens, parents, sampled: false }]);
      const rows = tree.size + 1;
      const logits = Float32Array.from({ length: rows * vocab }, () => 6 * (rng.next() - 0.5));
      // Let the LLM agree with some nodes, so the walk goes deep.
      for (let node = 0; node < tree.size; node += 3) logits[(tree.parents[node] + 1) * vocab + tree.tokens[node]] = 9;
      const onCpu = new NativeSampler(cpu, vocab);
      const onGpu = new NativeSampler(gpu, vocab);
      try {
        for (const params of MODES) {
          const context = Array.from({ length: 40 }, () => Math.floor(rng.next() * vocab));
          const step = requestRows(params, SEED, context, tree);
          const [want] = onCpu.step(logits, step.rows, [step.tree]);
          const [got] = onGpu.step(logits, step.rows, [step.tree]);
          // Each row's own pick, through one-row trees.
          const single = step.rows.map(() => ({ parents: Int32Array.of(-1), tokens: Int32Array.of(0) }));
          const wantRows = onCpu.step(logits, step.rows, single).map((o) => o.bonus);
          const gotRows = onGpu.step(logits, step.rows, single).map((o) => o.bonus);
          step.rows.forEach((row: SampleRow, r) => {
            const probs = onCpu.probsRow(r);
            const gpuProbs = onGpu.probsRow(r);
            for (let i = 0; i < vocab; i += 97) expect(Math.abs(gpuProbs[i] - probs[i])).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(probs[i])));
            if (gotRows[r] !== wantRows[r]) {
              expect(params.temperature).toBeGreaterThan(0);
              expect(nearBoundary(probs, uniformAt(row.seed, row.position))).toBe(true);
            }
          });
          if (gotRows.every((t, r) => t === wantRows[r])) expect(got).toEqual(want);
        }
      } finally {
        onCpu.close();
        onGpu.close();
      }
    });
  }

  gpuTest("bad parameters and malformed trees are refused with the CPU library's messages", () => {
    const vocab = 16;
    const sampler = new NativeSampler(gpu, vocab);
    try {
      const bad: SamplingParams = { temperature: 1, topK: 0, topP: 0, minP: 0, repetitionPenalty: 1 };
      const one = [{ parents: Int32Array.of(-1), tokens: Int32Array.of(0) }];
      expect(() => sampler.step(new Float32Array(vocab), [{ params: bad, counts: null, seed: 0, position: 0 }], one)).toThrow(
        /si_sample: row 0: top_p must be in \(0, 1\]/,
      );
      const ok: SamplingParams = { ...bad, topP: 1 };
      const rows = [0, 1].map(() => ({ params: ok, counts: null, seed: 0, position: 0 }));
      expect(() => sampler.step(new Float32Array(2 * vocab), rows, [{ parents: Int32Array.of(-1, 1), tokens: Int32Array.of(0, 2) }])).toThrow(
        /si_tree_accept: tree 0 row 1 has parent 1/,
      );
    } finally {
      sampler.close();
    }
  });
});

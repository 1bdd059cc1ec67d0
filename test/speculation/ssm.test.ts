// The SSM drafter runs a real model over its own paged KV cache: a width-1 tree must
// be exactly the draft model's own greedy continuation, step after step, for several
// sequences drafted in lockstep.

import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { createEngine } from "../../src/engine/core";
import { loadModel } from "../../src/model/registry";
import { Rng } from "../../src/speculation/rng";
import { GREEDY } from "../../src/speculation/sampling";
import { SSMDrafter } from "../../src/speculation/ssm";
import { parseTreeShape } from "../../src/speculation/tree";
import { writeTinyModel } from "../helpers/tiny-model";

const backend = CpuBackend.create({ threads: 2 });
const dir = mkdtempSync(join(tmpdir(), "specinfer-ssm-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const dims = { vocab: 48, hidden: 32, intermediate: 64, layers: 2, heads: 2, kvHeads: 1 };
const ssmModel = loadModel(writeTinyModel(dir, { seed: 5, dims, dtype: "F16", format: "gguf" }).path, backend, { maxBatchTokens: 256 });

function greedyContinuation(prompt: number[], n: number): number[] {
  const engine = createEngine(ssmModel, { maxRequestsPerBatch: 1 });
  const r = engine.submit(prompt, { maxNewTokens: n, ignoreEos: true });
  engine.runUntilDone();
  engine.close();
  return r.generated;
}

test("a width-1 draft is the draft model's own greedy continuation, across steps and sequences", () => {
  const depth = 5;
  const drafter = new SSMDrafter(ssmModel, 4, 256, depth);
  const shape = parseTreeShape(Array(depth).fill(1).join(","));
  const seqs = [[1, 4, 9, 16], [1, 2], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 3]];
  seqs.forEach((_, i) => drafter.open(i));
  for (let step = 0; step < 4; step++) {
    const trees = drafter.draft(seqs.map((tokens, i) => ({ request: i, shape, sample: false, tokens, params: GREEDY, rng: new Rng(i) })));
    seqs.forEach((tokens, i) => {
      expect(Array.from(trees[i].parents)).toEqual([-1, 0, 1, 2, 3]);
      expect(Array.from(trees[i].tokens)).toEqual(greedyContinuation(tokens, depth));
      // Accept a prefix of the draft plus a token of "the LLM's own", as verification would.
      const accepted = [...Array.from(trees[i].tokens.subarray(0, step % 3)), (step * 7 + i) % 48];
      drafter.accept(i, accepted);
      tokens.push(...accepted);
    });
  }
  seqs.forEach((_, i) => drafter.close(i));
  expect(drafter.kv.freeBlocks).toBe(drafter.kv.totalBlocks);
  drafter.closeAll();
});

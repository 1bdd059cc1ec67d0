// A request whose tokens cannot be picked fails alone: an overflowing repetition penalty
// leaves its distribution no mass (si_sample answers -1 for its row); the request ends
// with an error naming that, while the requests sharing its steps finish with the text
// they have alone. A temperature below 1e-5 resolves to greedy.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu";
import { resolveGenerationConfig } from "../../src/engine/config";
import { createEngine } from "../../src/engine/core";
import { loadModel } from "../../src/model/registry";
import { createSpeculator } from "../../src/speculation/speculator";
import { writeTinyModel } from "../helpers/tiny-model";

const backend = CpuBackend.create({ threads: 2 });
const dir = mkdtempSync(join(tmpdir(), "specinfer-guard-"));
const VOCAB = 64;
const dims = { vocab: VOCAB, hidden: 32, intermediate: 64, layers: 1, heads: 2, kvHeads: 1 };
const llm = loadModel(writeTinyModel(join(dir, "llm"), { seed: 5, dims, dtype: "F32", format: "gguf", maxPositionEmbeddings: 128 }).path, backend, { maxBatchTokens: 256 });
const ssm = loadModel(writeTinyModel(join(dir, "ssm"), { seed: 5, dims, dtype: "Q8_0", format: "gguf", maxPositionEmbeddings: 128 }).path, backend, { maxBatchTokens: 256 });
afterAll(() => {
  llm.close();
  ssm.close();
  backend.close();
  rmSync(dir, { recursive: true, force: true });
});

const prompt = [1, 5, 9, 12, 3, 7, 7, 2];
/** Every token but 0 in the prompt: with a denormal repetition penalty, every positive
 *  logit among them becomes +inf, and (inf - inf) leaves no finite weight. */
const everyToken = Array.from({ length: VOCAB - 1 }, (_, i) => i + 1);
const poisoned = { temperature: 1, repetitionPenalty: 1e-300, maxNewTokens: 8 };

describe("per-request sampling failures", () => {
  for (const speculation of [false, { tree: "1,2" }] as const) {
    test(`a request with no mass fails alone; its step's other requests finish as alone (speculation ${JSON.stringify(speculation)})`, () => {
      const make = () => createEngine(llm, { maxRequestsPerBatch: 4, speculator: createSpeculator(llm, 4, { ssms: [ssm], ngram: false }) });
      const alone = make();
      const soloReq = alone.submit(prompt, { maxNewTokens: 8, speculation });
      alone.runUntilDone();
      alone.close();

      const engine = make();
      const good = engine.submit(prompt, { maxNewTokens: 8, speculation });
      const bad = engine.submit(everyToken, { ...poisoned, speculation });
      const events = engine.runUntilDone();
      const finish = (id: number) => events.find((e) => e.type === "finish" && e.id === id);
      expect(finish(bad.id)).toMatchObject({ reason: "error", error: expect.stringMatching(/distribution has no mass/) });
      expect(finish(good.id)).toMatchObject({ reason: "length" });
      expect(good.generated).toEqual(soloReq.generated);
      expect(engine.kv.freeBlocks).toBe(engine.kv.totalBlocks);
      engine.close();
    });
  }

  test("a temperature below 1e-5 resolves to greedy; 1e-5 itself stays sampled", () => {
    expect(resolveGenerationConfig({ temperature: 5e-324 }).temperature).toBe(0);
    expect(resolveGenerationConfig({ temperature: 9.99e-6 }).temperature).toBe(0);
    expect(resolveGenerationConfig({ temperature: 1e-5 }).temperature).toBe(1e-5);
  });
});

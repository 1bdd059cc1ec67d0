// The engine off the caller's thread: while a generation whose steps take about a
// second runs in the Worker, the caller's timers keep firing; a dead Worker rejects
// every pending call instead of hanging.

import { afterAll, expect, test } from "bun:test";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EngineClient, EngineClosedError } from "../../src/runtime/client";
import type { EngineEvent } from "../../src/engine/core";
import { DEFAULT_MODEL } from "../../src/runtime/paths";
import { writeTinyModel } from "../helpers/tiny-model";

const dir = mkdtempSync(join(tmpdir(), "specinfer-client-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A random model big enough that a 2000-token prefill step takes about a second on
 *  two cores, with the embedded model's tokenizer (same vocabulary size). */
function slowModel(): string {
  const { path } = writeTinyModel(dir, {
    seed: 5,
    dims: { vocab: 4096, hidden: 512, intermediate: 1536, layers: 6, heads: 8, kvHeads: 8 },
    dtype: "F16",
    format: "safetensors",
    maxPositionEmbeddings: 4096,
  });
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(join(DEFAULT_MODEL, f), join(dir, f));
  return path;
}

function generate(client: EngineClient, prompt: number[], maxNewTokens: number): Promise<Extract<EngineEvent, { type: "finish" }>> {
  return new Promise((resolve, reject) => {
    client.submit(prompt, { maxNewTokens, ignoreEos: true, temperature: 0 }, {
      onEvent: (e) => e.type === "finish" && resolve(e),
      onError: reject,
    });
  });
}

test("a 5 ms timer on the caller's thread never waits more than 50 ms while ~1 s steps run in the Worker", async () => {
  const client = await EngineClient.start({ model: slowModel(), ssms: [], maxTokensPerBatch: 2048, maxRequestsPerBatch: 2 }, { worker: true });
  const prompt = Array.from({ length: 2000 }, (_, i) => 3 + (i % 4000));
  let last = performance.now();
  let worst = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    worst = Math.max(worst, now - last);
    last = now;
  }, 5);
  const finish = await generate(client, prompt, 4);
  clearInterval(timer);
  await client.close();
  // The steps really were long: the prefill pass alone took most of a second or more.
  expect(finish.stats.prefillMs).toBeGreaterThan(300);
  console.log(`prefill ${finish.stats.prefillMs} ms; longest timer gap ${worst.toFixed(1)} ms`);
  expect(worst).toBeLessThan(50);
}, 120_000);

test("a Worker that dies rejects every pending call with a clear error", async () => {
  const client = await EngineClient.start({ ssms: [] }, { worker: true });
  const pending = generate(client, [1, 2, 3], 100_000).catch((e: Error) => e);
  client.killWorkerForTest(70);
  const stats = client.stats().catch((e: Error) => e); // queued behind the exit: never answered
  const [a, b] = await Promise.all([pending, stats]);
  for (const e of [a, b]) {
    expect(e).toBeInstanceOf(EngineClosedError);
    expect((e as Error).message).toMatch(/engine worker exited \(code 70\)/);
  }
  await expect(client.stats()).rejects.toBeInstanceOf(EngineClosedError);
}, 60_000);

// bun run bench:overlap — drafting overlapped with verification. The same greedy
// requests run on runtimes of the pair widened to TinyLlama-1.1B cost:
//   in-thread:          the SSM drafts on the engine's thread between the LLM's forwards,
//                       every context with all THREADS threads;
//   overlapped:         the SSM on a device of its own (`ssmDevice`: a Worker; on the CPU
//                       the cores shared out, THREADS/2 each), the engine verifying one
//                       micro-batch while the SSM drafts the other in every step with two
//                       or more speculating requests (no measured costs);
//   overlapped (cost):  the same, overlapping only in steps where the measured cost
//                       curves say it pays (what a user gets by default);
//   in-thread, half:    drafting in-thread on the overlapped runtimes' share of threads
//                       (CPU): against it the overlap's own effect shows, apart from the
//                       split of the cores.
// Generated tokens/s per concurrency and tree, the runs interleaved, plain decoding
// alongside for scale. JSON on stdout, progress on stderr. Run it on a quiet machine.
// QUICK=1: a small widening and fewer tokens. BACKEND=cuda: on the GPU (the SSM on GPU
// SSM_DEVICE, default 0, with a stream of its own).

import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { BackendKind } from "../src/backend/index";
import type { WriteDType } from "../src/model/encoding";
import { Runtime, type RuntimeOptions } from "../src/runtime/load";
import { loadavg, median, OtherLoad, round } from "./lib/measure";
import { widenedPair, widenSpecs } from "./lib/widened";

const QUICK = process.env.QUICK === "1";
const BACKEND = (process.env.BACKEND ?? "cpu") as BackendKind;
const THREADS = Number(process.env.THREADS ?? 2);
const SSM_DEVICE = Number(process.env.SSM_DEVICE ?? (BACKEND === "cuda" ? 0 : 1));
const CONCURRENCY = (process.env.CONCURRENCY ?? "2,4,8").split(",").map(Number);
const TREES = (process.env.TREES ?? "1,1,1;1,1,3,1,1").split(";");
const REPEATS = Number(process.env.REPEATS ?? 3);
const NEW_TOKENS = QUICK ? 24 : 48;
const log = (msg: string) => process.stderr.write(`[bench:overlap] ${msg}\n`);

const pair = widenedPair(widenSpecs(QUICK, (process.env.WIDEN_DTYPE ?? "Q8_0") as WriteDType), join(import.meta.dir, ".models"), log);
const prompts = readFileSync(join(import.meta.dir, "..", "models", "eval-prompts.jsonl"), "utf8")
  .trim()
  .split("\n")
  .map((line) => (JSON.parse(line) as { prompt: string }).prompt);

const half = Math.max(1, THREADS / 2);
const CONFIGS: { name: string; options: Partial<RuntimeOptions> }[] = [
  { name: "inThread", options: { threads: THREADS } },
  { name: "overlapped", options: { ssmDevice: SSM_DEVICE, threads: half } },
  { name: "overlappedByCost", options: { ssmDevice: SSM_DEVICE, threads: half, measure: true } },
  ...(BACKEND === "cpu" ? [{ name: "inThreadHalfThreads", options: { threads: half } }] : []),
];

async function load(o: Partial<RuntimeOptions>): Promise<Runtime> {
  const base: RuntimeOptions = { model: pair.target, ssms: [pair.draft], backend: BACKEND, maxRequestsPerBatch: Math.max(...CONCURRENCY), measure: false };
  const { threads, ...rest } = o;
  return Runtime.load({ ...base, ...(BACKEND === "cpu" ? { threads } : {}), ...rest });
}

interface Run {
  tokensPerSecond: number;
  steps: number;
  overlappedSteps: number;
  accepted: number;
}

/** `concurrency` requests at once, stepped until all are done. */
function run(runtime: Runtime, concurrency: number, speculation: false | { tree: string }): Run {
  const engine = runtime.engine;
  const overlappedBefore = engine.stats().overlappedSteps;
  const reqs = Array.from({ length: concurrency }, (_, i) =>
    engine.submit(runtime.tokenizer.encode(prompts[i % prompts.length]), { maxNewTokens: NEW_TOKENS, ignoreEos: true, temperature: 0, speculation }),
  );
  const t0 = performance.now();
  let steps = 0;
  while (!engine.idle) {
    engine.step();
    steps++;
  }
  const seconds = (performance.now() - t0) / 1000;
  const tokens = reqs.reduce((n, r) => n + r.generated.length, 0);
  return {
    tokensPerSecond: round(tokens / seconds, 2),
    steps,
    overlappedSteps: engine.stats().overlappedSteps - overlappedBefore,
    accepted: reqs.reduce((n, r) => n + r.fromDraft.filter(Boolean).length, 0),
  };
}

log(`loading ${CONFIGS.length} runtimes (${BACKEND}; ${THREADS} threads in-thread, ssmDevice ${SSM_DEVICE})`);
const runtimes = [];
for (const c of CONFIGS) runtimes.push(await load(c.options));
// Warm-up: page in the runtimes' weights.
for (const r of runtimes) run(r, 2, { tree: TREES[0] });

const other = new OtherLoad();
const rows: Record<string, unknown>[] = [];
for (const concurrency of CONCURRENCY) {
  for (const tree of TREES) {
    const runs: Run[][] = CONFIGS.map(() => []);
    for (let r = 0; r < REPEATS; r++) {
      // Alternate the order, so drift hits all alike.
      const order = CONFIGS.map((_, k) => (r % 2 === 0 ? k : CONFIGS.length - 1 - k));
      for (const k of order) runs[k].push(run(runtimes[k], concurrency, { tree }));
    }
    const plain = run(runtimes[0], concurrency, false);
    const rate = runs.map((rs) => median(rs.map((x) => x.tokensPerSecond)));
    const row: Record<string, unknown> = { concurrency, tree, plainTokensPerSecond: plain.tokensPerSecond };
    CONFIGS.forEach((c, k) => {
      const first = runs[k][0];
      row[c.name] = { tokensPerSecond: rate[k], repeats: runs[k].map((x) => x.tokensPerSecond), steps: first.steps, overlappedSteps: first.overlappedSteps, accepted: first.accepted };
    });
    CONFIGS.forEach((c, k) => k > 0 && (row[`${c.name}OverInThread`] = round(rate[k] / rate[0], 3)));
    rows.push(row);
    log(`c=${concurrency} tree ${tree}: ${CONFIGS.map((c, k) => `${c.name} ${rate[k]}`).join(", ")} tok/s; plain ${plain.tokensPerSecond}`);
  }
}
const otherLoad = other.stop();
for (const r of runtimes) r.close();
console.log(JSON.stringify({ date: new Date().toISOString(), backend: BACKEND, threads: THREADS, ssmDevice: SSM_DEVICE, quick: QUICK, newTokens: NEW_TOKENS, loadavg: loadavg(), otherLoad, pair, rows }, null, 2));

// bun run bench:serve — the serving engine under concurrent load: throughput, time to
// first token and inter-token latency (p50/p99) at 1, 4, 8 and 16 concurrent clients,
// with speculation off, "auto" (sized per step by measured cost) and the fixed tree
// 1,1,1, on the embedded pair and on the pair widened to TinyLlama-1.1B cost. Greedy,
// models/eval-prompts.jsonl. JSON on stdout, progress and a table on stderr. Run it on
// a quiet machine. QUICK=1: a small widening and fewer tokens.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { LLM, type GenerateOptions } from "../src/index";
import type { WriteDType } from "../src/model/encoding";
import { DEFAULT_DRAFT } from "../src/runtime/paths";
import { loadavg, OtherLoad, round } from "./lib/measure";
import { WIDENED_TREES, widenedPair, widenSpecs } from "./lib/widened";

const QUICK = process.env.QUICK === "1";
const THREADS = Number(process.env.THREADS ?? 2);
const CONCURRENCY = (process.env.CONCURRENCY ?? "1,4,8,16").split(",").map(Number);
const PAIRS = (process.env.PAIRS ?? "embedded,widened").split(",");
const log = (msg: string) => process.stderr.write(`[bench:serve] ${msg}\n`);

const prompts = readFileSync(join(import.meta.dir, "..", "models", "eval-prompts.jsonl"), "utf8")
  .trim()
  .split("\n")
  .map((line) => (JSON.parse(line) as { prompt: string }).prompt);

const MODES: { name: string; speculation: GenerateOptions["speculation"] }[] = [
  { name: "off", speculation: false },
  { name: "auto", speculation: "auto" },
  { name: "fixed 1,1,1", speculation: { tree: "1,1,1" } },
];

function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return 0;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

interface RequestTiming {
  ttftMs: number;
  /** Per emitted token after the first: the gap before its piece over the piece's tokens. */
  itlMs: number[];
  tokens: number;
  steps: number;
  treeNodes: number;
  accepted: number;
}

async function timedRequest(llm: LLM, prompt: string, opts: GenerateOptions): Promise<RequestTiming> {
  const t0 = performance.now();
  let last = t0;
  let ttft = -1;
  const itl: number[] = [];
  const stream = llm.stream(prompt, opts);
  for (;;) {
    const next = await stream.next();
    if (next.done) {
      const s = next.value.stats;
      return { ttftMs: ttft, itlMs: itl, tokens: next.value.tokens.length, steps: s.decodeSteps, treeNodes: s.draftTokens, accepted: s.acceptedTokens };
    }
    const n = next.value.tokens.length;
    if (n === 0) continue;
    const now = performance.now();
    if (ttft < 0) {
      ttft = now - t0;
      for (let i = 1; i < n; i++) itl.push(0);
    } else for (let i = 0; i < n; i++) itl.push((now - last) / n);
    last = now;
  }
}

/** `clients` loops, each taking the next prompt until `requests` are done. */
async function load(llm: LLM, clients: number, requests: number, opts: GenerateOptions) {
  let next = 0;
  const timings: RequestTiming[] = [];
  const other = new OtherLoad();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (next < requests) {
        const prompt = prompts[next++ % prompts.length];
        timings.push(await timedRequest(llm, prompt, opts));
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const tokens = timings.reduce((a, t) => a + t.tokens, 0);
  const steps = timings.reduce((a, t) => a + t.steps, 0);
  const accepted = timings.reduce((a, t) => a + t.accepted, 0);
  return {
    clients,
    requests,
    tokensPerSecond: round(tokens / seconds, 2),
    ttftMs: { p50: round(percentile(timings.map((t) => t.ttftMs), 50), 2), p99: round(percentile(timings.map((t) => t.ttftMs), 99), 2) },
    itlMs: { p50: round(percentile(timings.flatMap((t) => t.itlMs), 50), 2), p99: round(percentile(timings.flatMap((t) => t.itlMs), 99), 2) },
    meanAcceptedLength: steps > 0 ? round((accepted + steps) / steps, 3) : 0,
    meanTreeNodesPerStep: steps > 0 ? round(timings.reduce((a, t) => a + t.treeNodes, 0) / steps, 2) : 0,
    otherProcessesCores: other.stop(),
  };
}

/** Extra fixed trees run at one client only, inside the same interleaved repeats: the
 *  list bench:cpu compares on the widened pair, so "auto" can be held against the best
 *  of them run back to back with it. */
async function benchPair(
  name: string, model: string | undefined, ssms: string[], newTokens: number,
  { requestsPerClient, repeats, extraTrees = [] }: { requestsPerClient: number; repeats: number; extraTrees?: string[] },
) {
  log(`${name}: loading (${model ?? "embedded"})`);
  const llm = await LLM.load(model, { threads: THREADS, ssms, tree: "1,1,1", maxRequestsPerBatch: 16 });
  const opts: GenerateOptions = { maxNewTokens: newTokens, temperature: 0, ignoreEos: true };
  await load(llm, 2, 4, opts); // warm-up: JIT, page cache, the cost model's first observations
  const rows: Record<string, unknown>[] = [];
  for (const clients of CONCURRENCY) {
    const requests = Math.max(requestsPerClient * clients, 8);
    const modes = clients === 1 ? [...MODES, ...extraTrees.map((tree) => ({ name: `fixed ${tree}`, speculation: { tree } }))] : MODES;
    // Modes interleaved per repeat, so drift in machine speed hits them alike; the
    // repeat with the median throughput is reported.
    const runs: Record<string, Awaited<ReturnType<typeof load>>[]> = {};
    for (let rep = 0; rep < repeats; rep++) {
      for (const mode of modes) (runs[mode.name] ??= []).push(await load(llm, clients, requests, { ...opts, speculation: mode.speculation }));
    }
    for (const mode of modes) {
      const inOrder = runs[mode.name].map((x) => x.tokensPerSecond);
      const r = [...runs[mode.name]].sort((a, b) => a.tokensPerSecond - b.tokensPerSecond)[Math.floor(repeats / 2)];
      rows.push({ mode: mode.name, ...r, repeatsTokensPerSecond: inOrder });
      log(`  ${name} c=${clients} ${mode.name}: ${r.tokensPerSecond} tok/s (repeats ${inOrder.join(", ")}), ttft p50 ${r.ttftMs.p50} ms, itl p50 ${r.itlMs.p50} p99 ${r.itlMs.p99} ms, tree ${r.meanTreeNodesPerStep}, accepted ${r.meanAcceptedLength} (other load ${r.otherProcessesCores})`);
    }
  }
  const costCurve = (await llm.stats()).costCurve;
  await llm.close();
  const rate = (c: number, mode: string) => rows.find((r) => r.clients === c && r.mode === mode)?.tokensPerSecond as number;
  // Median over repeats of the ratio within each repeat (the two ran back to back), so
  // drift in machine speed between repeats cancels.
  const runsOf = (c: number, mode: string) => rows.find((r) => r.clients === c && r.mode === mode)?.repeatsTokensPerSecond as number[];
  const ratio = (c: number, a: string, b: string) => {
    const [xs, ys] = [runsOf(c, a), runsOf(c, b)];
    return round(percentile(xs.map((x, i) => x / ys[i]), 50), 3);
  };
  const fixedTrees = CONCURRENCY.includes(1) ? ["1,1,1", ...extraTrees].map((t) => runsOf(1, `fixed ${t}`)) : [];
  const ratios = {
    autoOverOff: Object.fromEntries(CONCURRENCY.map((c) => [c, ratio(c, "auto", "off")])),
    autoOverFixed: Object.fromEntries(CONCURRENCY.map((c) => [c, ratio(c, "auto", "fixed 1,1,1")])),
    // Within each repeat: auto over the fastest fixed tree of that repeat.
    autoOverBestFixedAtOneClient: CONCURRENCY.includes(1)
      ? round(percentile(runsOf(1, "auto").map((x, i) => x / Math.max(...fixedTrees.map((f) => f[i]))), 50), 3)
      : null,
    // 8 concurrent clients against the same 8 requests one after another (1 client).
    concurrent8OverSequential: CONCURRENCY.includes(8) && CONCURRENCY.includes(1)
      ? Object.fromEntries(MODES.map((m) => [m.name, round(rate(8, m.name) / rate(1, m.name), 3)]))
      : null,
  };
  log(`  ${name} ratios: ${JSON.stringify(ratios)}`);
  return { pair: name, newTokens, costCurve, rows, ratios };
}

const results: Record<string, unknown> = { date: new Date().toISOString(), threads: THREADS, loadavgBefore: loadavg(), pairs: [] };
if (PAIRS.includes("embedded")) (results.pairs as unknown[]).push(await benchPair("embedded", undefined, [DEFAULT_DRAFT], QUICK ? 32 : 128, { requestsPerClient: QUICK ? 2 : 8, repeats: QUICK ? 1 : 5 }));
if (PAIRS.includes("widened")) {
  const { target, draft } = widenedPair(widenSpecs(QUICK, (process.env.WIDEN_DTYPE ?? "Q8_0") as WriteDType), join(import.meta.dir, ".models"), log);
  (results.pairs as unknown[]).push(await benchPair("widened", target, [draft], QUICK ? 16 : 48, { requestsPerClient: 4, repeats: QUICK ? 1 : 3, extraTrees: WIDENED_TREES }));
}
results.loadavgAfter = loadavg();
process.stderr.write(markdownTable(results.pairs as Awaited<ReturnType<typeof benchPair>>[]) + "\n");
process.stdout.write(JSON.stringify(results, null, 2) + "\n");

/** The rows as the table BENCHMARKS.md carries. */
function markdownTable(pairs: Awaited<ReturnType<typeof benchPair>>[]): string {
  const lines = [
    "| pair | clients | speculation | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | tree nodes per step | accepted per step |",
    "|---|---|---|---|---|---|---|---|",
  ];
  for (const p of pairs) {
    for (const r of p.rows as any[]) {
      lines.push(`| ${p.pair} | ${r.clients} | ${r.mode} | ${r.tokensPerSecond} | ${r.ttftMs.p50} / ${r.ttftMs.p99} | ${r.itlMs.p50} / ${r.itlMs.p99} | ${r.meanTreeNodesPerStep} | ${r.meanAcceptedLength} |`);
    }
  }
  return lines.join("\n");
}

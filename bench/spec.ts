// bun run bench:spec — speculative vs incremental decoding on the vendored trained pair,
// greedy, over models/eval-prompts.jsonl: tokens/s, mean accepted length (tokens per
// LLM pass) and speedup over incremental, for several static and dynamic trees.
// JSON on stdout, progress on stderr. Run it on a quiet machine.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { DEFAULT_DRAFT, DEFAULT_MODEL, LLM, SSM, type CompileOptions } from "../src/index";
import { DEFAULT_TREE } from "../src/speculation/speculator";

const THREADS = Number(process.env.THREADS ?? 2);
const PROMPTS = Number(process.env.PROMPTS ?? 40);
const NEW_TOKENS = Number(process.env.NEW_TOKENS ?? 64);
const log = (msg: string) => process.stderr.write(`[bench:spec] ${msg}\n`);

const prompts = readFileSync(join(import.meta.dir, "..", "models", "eval-prompts.jsonl"), "utf8")
  .trim()
  .split("\n")
  .slice(0, PROMPTS)
  .map((line) => (JSON.parse(line) as { prompt: string }).prompt);

const llm = await LLM.load(DEFAULT_MODEL, { threads: THREADS });
const ssm = await SSM.load(DEFAULT_DRAFT, { llm });

const trees = (process.env.TREES ?? `1,1,1,1;1,1,1,1,1,1;2,1,1,1;2,2,1,1;3,1,1,1,1;${DEFAULT_TREE};dynamic:8;dynamic:16;dynamic:32`).split(";");
const setups: { name: string; compile: CompileOptions | null }[] = [
  { name: "incremental", compile: null },
  ...trees.map((tree) => ({ name: `ssm tree ${tree}`, compile: { ssms: [ssm], tree } })),
  { name: `ssm tree ${DEFAULT_TREE} + ngram`, compile: { ssms: [ssm], tree: DEFAULT_TREE, ngram: true } },
  { name: "ngram only", compile: { ngram: true } },
];

// Warm up the JIT and the page cache once.
await llm.generate(prompts[0], { maxNewTokens: 16 });

const results = [];
let baseline = 0;
for (const setup of setups) {
  llm.compile(setup.compile);
  let tokens = 0;
  let decodeMs = 0;
  let steps = 0;
  let accepted = 0;
  const outputs: number[][] = [];
  const t0 = performance.now();
  for (const p of prompts) {
    const r = await llm.generate(p, { maxNewTokens: NEW_TOKENS, ignoreEos: true });
    tokens += r.stats.generatedTokens - 1;
    decodeMs += r.stats.decodeMs;
    steps += r.stats.decodeSteps;
    accepted += r.stats.acceptedTokens;
    outputs.push(r.tokens);
  }
  const wallMs = performance.now() - t0;
  const tps = (tokens / decodeMs) * 1000;
  if (setup.compile === null) baseline = tps;
  const row = {
    setup: setup.name,
    decodeTokensPerSecond: Math.round(tps * 10) / 10,
    meanAcceptedLength: Math.round(((accepted + steps) / steps) * 1000) / 1000,
    speedup: Math.round((tps / baseline) * 1000) / 1000,
    wallSeconds: Math.round(wallMs) / 1000,
  };
  results.push(row);
  log(JSON.stringify(row));
}
llm.close();
console.log(JSON.stringify({ bench: "spec", threads: THREADS, prompts: prompts.length, newTokens: NEW_TOKENS, defaultTree: DEFAULT_TREE, results }, null, 2));

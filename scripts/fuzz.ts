// Model-file fuzzer: `npm run fuzz -- --cases N --seed S [--keep-going]`. Mutates tiny GGUF and HF
// models, loads each in a child process and checks it loads and runs or is refused
// with an error naming the file (see test/model/fuzz-runner.ts). Exits 1 on the first
// failure, printing the shrunk case and the seed/path that replay it; --keep-going
// runs every case and lists all the failures instead.

import { parseArgs } from "node:util";
import { runFuzz } from "../test/model/fuzz-runner.ts";

const { values } = parseArgs({
  options: { cases: { type: "string", default: "10000" }, seed: { type: "string" }, "keep-going": { type: "boolean", default: false } },
});
const cases = Number(values.cases);
const seed = values.seed === undefined ? Date.now() % 2 ** 31 : Number(values.seed);
if (!Number.isSafeInteger(cases) || cases < 1) throw new Error(`--cases must be a positive integer, got ${values.cases}`);
if (!Number.isSafeInteger(seed)) throw new Error(`--seed must be an integer, got ${values.seed}`);

console.log(`fuzzing ${cases} cases, seed ${seed}`);
const started = performance.now();
try {
  const stats = await runFuzz({
    seed,
    cases,
    keepGoing: values["keep-going"],
    onCase: (done) => {
      if (done % 500 === 0) console.log(`  ${done} cases, ${((performance.now() - started) / 1000).toFixed(1)} s`);
    },
  });
  const seconds = (performance.now() - started) / 1000;
  console.log(`${stats.cases} cases in ${seconds.toFixed(1)} s: ${stats.loaded} loaded and ran, ${stats.refused} refused; peak memory at most ${stats.maxExcessGrowth} bytes beyond a case's files`);
  const reasons = [...stats.reasons].sort((a, b) => b[1] - a[1]);
  for (const [reason, n] of reasons.slice(0, 40)) console.log(`  ${String(n).padStart(6)}  ${reason}`);
  for (const f of stats.failures) console.log(`FAILED ${JSON.stringify(f.case, compact)}\n  ${f.why.slice(0, 1000)}`);
  if (stats.failures.length > 0) process.exit(1);
} catch (e) {
  console.error((e as Error).message);
  process.exit(1);
}

/** JSON.stringify replacer: bigints as "123n", long strings cut (the case stays readable). */
function compact(_key: string, v: unknown): unknown {
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v === "string" && v.length > 100) return `${v.slice(0, 60)}...(${v.length} chars)`;
  return v;
}

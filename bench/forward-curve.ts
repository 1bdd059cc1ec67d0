// bun bench/forward-curve.ts — forward time of the trained target (and the draft) at
// n = 1..32 chained tokens after a 60-token prefix, 2 threads; best of REPEATS runs.

import { join } from "node:path";
import { CpuBackend } from "../src/backend/cpu";
import { BatchBuilder } from "../src/model/batch";
import { loadModel } from "../src/model/registry";
import { createKVCache } from "../src/kv/cache";

const THREADS = Number(process.env.THREADS ?? 2);
const REPEATS = 5;
const be = CpuBackend.create({ threads: THREADS });
const results: Record<string, Record<number, number>> = {};
for (const name of ["llama-shakespeare-8m", "llama-shakespeare-1.4m-draft"]) {
  const m = loadModel(join(import.meta.dir, "..", "models", name), be, { maxBatchTokens: 128 });
  const kv = createKVCache(m, { maxSeqs: 1, maxSeqLen: 256 });
  const row = kv.openSequence();
  kv.reserve(row, 64);
  const pre = new BatchBuilder(m.maxWords);
  pre.addChain(row, 0, Array.from({ length: 60 }, (_, i) => 5 + i), 0, "none");
  m.forward(pre.build(), kv);
  kv.commitPrefix(row, 60);
  results[name] = {};
  for (const n of [1, 2, 4, 8, 16, 32]) {
    kv.reserve(row, n);
    const b = new BatchBuilder(m.maxWords);
    b.addChain(row, 60, Array.from({ length: n }, (_, i) => 7 + i), 60, "all");
    const batch = b.build();
    for (let i = 0; i < 50; i++) m.forward(batch, kv);
    let best = Infinity;
    for (let r = 0; r < REPEATS; r++) {
      const t = performance.now();
      for (let i = 0; i < 100; i++) m.forward(batch, kv);
      best = Math.min(best, ((performance.now() - t) * 1000) / 100);
    }
    results[name][n] = Math.round(best);
    process.stderr.write(`[forward-curve] ${name} n=${n} ${Math.round(best)} us\n`);
  }
  kv.close();
  m.close();
}
be.close();
console.log(JSON.stringify({ bench: "forward-curve", threads: THREADS, us: results }, null, 2));

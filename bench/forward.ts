// bun run bench:forward — decode and prefill tokens/s of the forward pass on the
// trained target model and on a seeded random ~110M-parameter LLaMA (F16 and Q8_0),
// 2 threads. JSON on stdout, progress on stderr. Run it on a quiet machine.

import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { CpuBackend } from "../src/backend/cpu";
import { BatchBuilder } from "../src/model/batch";
import type { CausalLM } from "../src/model/causal-lm";
import { loadModel } from "../src/model/registry";
import { writeTinyModel, type TinyDType } from "../test/helpers/tiny-model";
import { createKVCache } from "../src/kv/cache";

const THREADS = Number(process.env.THREADS ?? 2);
const PREFILL = 128;
const DECODE = 64;
const REPEATS = 3;
const cacheDir = join(import.meta.dir, ".models");

function log(msg: string) {
  process.stderr.write(`[bench:forward] ${msg}\n`);
}

/** A seeded random model of GPT-2-small/Llama-110M shape, written once and reused. */
function random110M(dtype: TinyDType): string {
  const dir = join(cacheDir, `random-110m-${dtype}`);
  const path = join(dir, "model.gguf");
  if (!existsSync(path)) {
    log(`writing ${path} (one time)`);
    mkdirSync(dir, { recursive: true });
    writeTinyModel(dir, {
      seed: 110,
      dtype,
      format: "gguf",
      dims: { vocab: 32000, hidden: 768, intermediate: 2048, layers: 12, heads: 12, kvHeads: 12 },
      maxPositionEmbeddings: 1024,
    });
  }
  return path;
}

/** Best-of-REPEATS times for one prefill of PREFILL tokens and DECODE single-token steps. */
function measure(model: CausalLM) {
  const vocab = model.config.vocabSize;
  const prompt = Array.from({ length: PREFILL }, (_, i) => 3 + ((i * 7919) % (vocab - 3)));
  let prefillMs = Infinity;
  let decodeMs = Infinity;
  for (let rep = 0; rep < REPEATS; rep++) {
    const kv = createKVCache(model, { maxSeqs: 1, maxSeqLen: PREFILL + DECODE + 1 });
    const row = kv.openSequence();
    kv.reserve(row, PREFILL);
    const pre = new BatchBuilder(model.maxWords);
    pre.addChain(row, 0, prompt, 0, "last");
    let t = performance.now();
    model.forward(pre.build(), kv);
    prefillMs = Math.min(prefillMs, performance.now() - t);
    kv.commit(row, prompt.map((_, i) => i));
    t = performance.now();
    let token = 5;
    for (let i = 0; i < DECODE; i++) {
      const pos = PREFILL + i;
      kv.reserve(row, 1);
      const b = new BatchBuilder(1);
      b.add(row, pos, token, pos, -1, true);
      const logits = model.forward(b.build(), kv);
      kv.commit(row, [pos]);
      token = 3 + (Math.abs(Math.floor(logits[0] * 1000)) % (vocab - 3));
    }
    decodeMs = Math.min(decodeMs, performance.now() - t);
    kv.close();
  }
  return {
    prefillTokensPerSecond: Math.round((PREFILL / prefillMs) * 1000 * 10) / 10,
    decodeTokensPerSecond: Math.round((DECODE / decodeMs) * 1000 * 10) / 10,
  };
}

const backend = CpuBackend.create({ threads: THREADS });
const cases: { name: string; path: string }[] = [
  { name: "llama-shakespeare-8m (F16, trained)", path: join(import.meta.dir, "..", "models", "llama-shakespeare-8m") },
  { name: "random-110m F16", path: random110M("F16") },
  { name: "random-110m Q8_0", path: random110M("Q8_0") },
];
const results = [];
for (const c of cases) {
  log(`measuring ${c.name}`);
  const model = loadModel(c.path, backend, { maxBatchTokens: PREFILL });
  const params = [...model.files.tensors.values()].reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0);
  results.push({ model: c.name, parameters: params, ...measure(model) });
  log(`  ${JSON.stringify(results[results.length - 1])}`);
  model.close();
}
backend.close();
console.log(JSON.stringify({ bench: "forward", threads: THREADS, prefillTokens: PREFILL, decodeTokens: DECODE, results }, null, 2));

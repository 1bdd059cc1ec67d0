// GPU benchmark of the CUDA backend; prints one JSON object (and writes it to --json PATH).
//
//   node_modules/.bin/bun bench/gpu.ts [--quick] [--json out.json] [--only=kernels,curve,widened,tp]
//
// - kernels: matmul weight GB/s for a 1.1B-like MLP shape (k=2048, m=5632) in F16 and
//   Q8_0 at n = 1 (decode), 16 and 64 (token trees on tensor cores); tree attention (16
//   tokens over a 1024-token prefix, TinyLlama's heads); the read probe's GB/s.
// - widened (the trained pair widened to TinyLlama-1.1B cost, bench/lib/widened.ts):
//   greedy decode tokens/s of the target as a fraction of the probe's bandwidth (weight
//   bytes per token x tokens/s), and speculative decoding against incremental: speedup
//   and whether the tokens are the incremental ones.
// - curve: the target's verify cost t(L)/t(1) for a chain of L = 1..64 tokens after a
//   128-token prefix, through CUDA graphs as the engine runs it.
// - tp: greedy tokens of the vendored pair with tensorParallel 1 and N (N = GPUS env)
//   against the unsplit model; "not available" where the runtime has no such option.
// Targets on an H200 are printed beside the figures. Times are host wall time over
// back-to-back calls ending in one sync, so launch overhead is included.

import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DType, DTYPE_NAMES, type Ptr } from "../src/backend/backend.ts";
import { CpuBackend } from "../src/backend/cpu.ts";
import { CudaBackend } from "../src/backend/cuda.ts";
import { StepGraphs } from "../src/engine/graphs.ts";
import { LLM, type LoadOptions } from "../src/api/llm.ts";
import { DEFAULT_DRAFT, DEFAULT_MODEL } from "../src/runtime/paths.ts";
import { createKVCache } from "../src/kv/cache.ts";
import { BatchBuilder } from "../src/model/batch.ts";
import type { CausalLM } from "../src/model/causal-lm.ts";
import type { WriteDType } from "../src/model/encoding.ts";
import { loadModel } from "../src/model/registry.ts";
import { DEFAULT_TREE } from "../src/speculation/speculator.ts";
import { round } from "./lib/measure.ts";
import { WIDENED_TREES, widenedPair, widenSpecs } from "./lib/widened.ts";

const args = process.argv.slice(2);
const QUICK = args.includes("--quick");
const jsonAt = args.indexOf("--json");
const jsonPath = jsonAt >= 0 ? args[jsonAt + 1] : undefined;
const only = args.find((a) => a.startsWith("--only="))?.slice(7).split(",");
const on = (section: string) => !only || only.includes(section);
const log = (msg: string) => process.stderr.write(`[gpu] ${msg}\n`);
const TARGETS = { decodeFractionOfBandwidth: 0.8, verify64OverVerify1: 1.5, speculativeSpeedup: 2.5 };
const results: Record<string, unknown> = { backend: "cuda", quick: QUICK, targets: TARGETS };

let seed = 12345;
const rand = () => {
  seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
  return seed / 4294967296;
};
const randF32 = (n: number) => Float32Array.from({ length: n }, () => rand() * 2 - 1);

/** Random F16 or Q8_0 weights [rows][k]. */
function weights(dtype: DType, rows: number, k: number): Uint8Array {
  if (dtype === DType.F16) {
    const u = new Uint16Array(rows * k);
    for (let i = 0; i < u.length; i++) u[i] = ((rand() < 0.5 ? 1 : 0) << 15) | ((10 + Math.floor(rand() * 5)) << 10) | Math.floor(rand() * 1024);
    return new Uint8Array(u.buffer);
  }
  const out = new Uint8Array(((rows * k) / 32) * 34);
  const dv = new DataView(out.buffer);
  for (let b = 0; b < (rows * k) / 32; b++) {
    dv.setUint16(b * 34, 0x2000 | Math.floor(rand() * 1024), true);
    for (let j = 2; j < 34; j++) out[b * 34 + j] = Math.floor(rand() * 256);
  }
  return out;
}

/** Weight bytes one decode step reads: every tensor but the embedding table, of which
 *  one row is read (unless it is also the output head). */
function bytesPerToken(model: CausalLM): number {
  let bytes = 0;
  for (const [name, t] of model.files.tensors) {
    const embeddingOnly = name === "model.embed_tokens.weight" && !model.config.tieWordEmbeddings;
    bytes += embeddingOnly ? t.bytes / t.shape[0]! : t.bytes;
  }
  return bytes;
}

function probeBandwidth(gpu: CudaBackend): number {
  const bytes = 1024 * 1024 * 1024;
  const b = gpu.alloc(bytes);
  const gbps = gpu.probeBandwidth(b.ptr, bytes, 10);
  gpu.free(b);
  return gbps;
}

// ---- kernels ------------------------------------------------------------------------------

function kernels(gpu: CudaBackend): Record<string, unknown> {
  const dev = (data: ArrayBufferView): Ptr => {
    const b = gpu.alloc(data.byteLength);
    gpu.upload(b.ptr, data);
    return b.ptr;
  };
  /** Seconds per call of fn, after warm-up. */
  const time = (fn: () => void, iters: number): number => {
    for (let i = 0; i < 5; i++) fn();
    gpu.sync();
    const t0 = performance.now();
    for (let i = 0; i < iters; i++) fn();
    gpu.sync();
    return (performance.now() - t0) / 1000 / iters;
  };

  const matmul: Record<string, { us: number; weight_gbps: number }> = {};
  const [k, m] = [2048, 5632];
  for (const dtype of [DType.F16, DType.Q8_0]) {
    const wb = weights(dtype, m, k);
    const w = dev(wb);
    for (const n of [1, 16, 64]) {
      const x = dev(randF32(n * k));
      const y = gpu.alloc(n * m * 4).ptr;
      const s = time(() => gpu.matmul(x, n, k, w, dtype, m, 0, y), 200);
      matmul[`${DTYPE_NAMES[dtype]}_n${n}`] = { us: round(s * 1e6, 2), weight_gbps: round(wb.byteLength / s / 1e9, 1) };
    }
  }

  const [nHeads, nKv, headDim, blockSize, prefix, n] = [32, 4, 64, 16, 1024, 16];
  const row = nKv * headDim;
  const maxBlocks = Math.ceil((prefix + n) / blockSize);
  const poolBlocks = maxBlocks + 8;
  const table = Int32Array.from({ length: maxBlocks }, (_, i) => (i * 7) % poolBlocks); // scattered ids
  const kp = dev(randF32(poolBlocks * blockSize * row));
  const vp = dev(randF32(poolBlocks * blockSize * row));
  const anc = new Uint32Array(n); // a binary tree: the parent of j is (j - 1) >> 1
  for (let j = 0; j < n; j++) for (let a = j; a >= 0; a = a === 0 ? -1 : (a - 1) >> 1) anc[j] |= 1 << a;
  const q = dev(randF32(n * nHeads * headDim));
  const out = gpu.alloc(n * nHeads * headDim * 4).ptr;
  const [bt, seq, committed, ancestors] = [dev(table), dev(new Int32Array(n)), dev(Int32Array.from([prefix])), dev(anc)];
  const s = time(
    () => gpu.attention(q, n, nHeads, nKv, headDim, kp, vp, DType.F32, bt, maxBlocks, blockSize, seq, committed, ancestors, 1, 0.125, out),
    200,
  );
  return { matmul, attention: { tokens: n, prefix, us: round(s * 1e6, 2) } };
}

// ---- verify-cost curve ----------------------------------------------------------------------

/** Seconds per forward of a chain of L = 1..64 tokens after a 128-token prefix, through
 *  StepGraphs (captured and replayed as in the engine). */
function verifyCurve(gpu: CudaBackend, path: string): Record<string, unknown> {
  const llm = loadModel(path, gpu, { maxBatchTokens: 256 });
  const kv = createKVCache(llm, { maxSeqs: 1, maxSeqLen: 512 });
  const graphs = new StepGraphs(llm);
  try {
    const row = kv.openSequence();
    kv.reserve(row, 256);
    const prefix = 128;
    const pre = new BatchBuilder(llm.maxWords);
    pre.addChain(row, 0, Array.from({ length: prefix }, (_, i) => 5 + (i % 200)), 0, "none");
    llm.forward(pre.build(), kv);
    kv.commitPrefix(row, prefix);
    const ms: Record<number, number> = {};
    for (let L = 1; L <= 64; L++) {
      const b = new BatchBuilder(llm.maxWords);
      b.addChain(row, prefix, Array.from({ length: L }, (_, i) => 7 + i), prefix, "all");
      const batch = b.build();
      for (let i = 0; i < 3; i++) graphs.run(batch, kv).host(); // eager, capture, replay
      const reps = 20;
      const t0 = performance.now();
      for (let i = 0; i < reps; i++) graphs.run(batch, kv).host(); // each ends with its logits download
      ms[L] = (performance.now() - t0) / reps;
    }
    const ratio = Object.fromEntries(Object.entries(ms).map(([L, t]) => [L, round(t / ms[1]!, 3)]));
    return { prefix, msAtL1: round(ms[1]!, 3), ratio, graphs: graphs.stats };
  } finally {
    gpu.graphDrop(-1);
    kv.close();
    llm.close();
  }
}

// ---- widened pair: decode bandwidth and speculation -------------------------------------------

async function widened(target: string, draft: string, probeGbps: number): Promise<Record<string, unknown>> {
  const cpu = CpuBackend.create({ threads: 1 }); // maps the file: sizes without a copy
  const model = loadModel(target, cpu);
  const targetBytes = bytesPerToken(model);
  model.close();
  cpu.close();
  const NEW = QUICK ? 32 : 64;
  const prompts = readFileSync(join(import.meta.dir, "..", "models", "eval-prompts.jsonl"), "utf8")
    .trim().split("\n").slice(0, QUICK ? 2 : 4).map((l) => (JSON.parse(l) as { prompt: string }).prompt);
  const llm = await LLM.load(target, { backend: "cuda", ssms: [draft], tree: DEFAULT_TREE });
  try {
    await llm.generate(prompts[0]!, { maxNewTokens: 8, ignoreEos: true }); // warm-up
    const run = async (tree: string | null) => {
      let tokens = 0;
      let ms = 0;
      const outs: number[][] = [];
      for (const p of prompts) {
        const r = await llm.generate(p, { maxNewTokens: NEW, ignoreEos: true, temperature: 0, speculation: tree === null ? false : { tree } });
        tokens += r.stats.generatedTokens - 1;
        ms += r.stats.decodeMs;
        outs.push(r.tokens);
      }
      return { tokensPerSecond: (tokens / ms) * 1000, outs };
    };
    const incremental = await run(null);
    const fraction = (incremental.tokensPerSecond * targetBytes) / (probeGbps * 1e9);
    const speculative: Record<string, unknown>[] = [];
    for (const tree of [DEFAULT_TREE, ...WIDENED_TREES]) {
      const r = await run(tree);
      const same = r.outs.every((o, i) => o.length === incremental.outs[i]!.length && o.every((t, j) => t === incremental.outs[i]![j]));
      speculative.push({ tree, tokensPerSecond: round(r.tokensPerSecond, 1), speedup: round(r.tokensPerSecond / incremental.tokensPerSecond, 3), tokensEqualIncremental: same });
      log(`widened: tree ${tree}: ${JSON.stringify(speculative[speculative.length - 1])}`);
    }
    const best = Math.max(...speculative.map((s) => s.speedup as number));
    return {
      target,
      draft,
      bytesPerToken: targetBytes,
      newTokens: NEW,
      prompts: prompts.length,
      incrementalTokensPerSecond: round(incremental.tokensPerSecond, 1),
      decodeFractionOfBandwidth: round(fraction, 3),
      speculative,
      bestSpeedup: best,
      greedySpeculativeEqualsIncremental: speculative.every((s) => s.tokensEqualIncremental),
      met: { decode: fraction >= TARGETS.decodeFractionOfBandwidth, speculative: best >= TARGETS.speculativeSpeedup },
    };
  } finally {
    await llm.close();
  }
}

// ---- tensor parallelism -----------------------------------------------------------------------

/** Greedy tokens of the vendored pair with tensorParallel 1 and GPUS against no option. */
async function tensorParallel(): Promise<Record<string, unknown>> {
  const gpus = Number(process.env.GPUS ?? 1);
  const greedy = async (extra: Record<string, unknown>) => {
    const llm = await LLM.load(DEFAULT_MODEL, { backend: "cuda", ssms: [DEFAULT_DRAFT], ...extra } as LoadOptions);
    try {
      const r = await llm.generate("ROMEO:\n", { maxNewTokens: 48, ignoreEos: true, temperature: 0 });
      return r.tokens;
    } finally {
      await llm.close();
    }
  };
  const reference = await greedy({});
  const out: Record<string, unknown> = { gpus };
  for (const n of gpus > 1 ? [1, gpus] : [1]) {
    try {
      const tokens = await greedy({ tensorParallel: n });
      out[`tp${n}`] = { tokensEqualUnsplit: tokens.length === reference.length && tokens.every((t, i) => t === reference[i]) };
    } catch (e) {
      out[`tp${n}`] = { error: (e as Error).message };
    }
  }
  return out;
}

// ---- main -----------------------------------------------------------------------------------

const gpu = CudaBackend.create();
const probeGbps = probeBandwidth(gpu);
results.probe_gbps = round(probeGbps, 1);
log(`probe: ${results.probe_gbps} GB/s`);
if (on("kernels")) {
  results.kernels = kernels(gpu);
  log(`kernels: ${JSON.stringify(results.kernels)}`);
}
if (on("curve") || on("widened")) {
  const dtype = (process.env.WIDEN_DTYPE ?? "Q8_0") as WriteDType;
  const pair = widenedPair(widenSpecs(QUICK, dtype), join(import.meta.dir, ".models"), log);
  if (on("curve")) {
    const curve = verifyCurve(gpu, pair.target);
    const r64 = (curve.ratio as Record<number, number>)[64]!;
    results.verifyCurve = { ...curve, met: r64 <= TARGETS.verify64OverVerify1 };
    log(`curve: t(64)/t(1) = ${r64}`);
  }
  if (on("widened")) results.widened = await widened(pair.target, pair.draft, probeGbps);
}
gpu.close();
if (on("tp")) results.tensorParallel = await tensorParallel();

const text = JSON.stringify(results, null, 2);
console.log(text);
if (jsonPath) writeFileSync(jsonPath, `${text}\n`);

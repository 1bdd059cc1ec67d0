// CUDA graphs (cuda/graph.cu, src/engine/graphs.ts): a replayed launch sequence computes
// what the same ops compute without a graph, on the step's new inputs; a step that
// differs from its capture is refused before anything of it runs. Runs only with
// SPECINFER_GPU=1 on a machine with a GPU; elsewhere every test is reported as skipped.
//
//   SPECINFER_GPU=1 node_modules/.bin/bun test test/backend/cuda-graph.test.ts --timeout 300000

import { afterAll, beforeAll, expect } from "bun:test";
import { join } from "node:path";
import { BackendError, DType, type Ptr } from "../../src/backend/backend.ts";
import type { CudaBackend } from "../../src/backend/cuda.ts";
import { StepGraphs, TOKEN_BUCKETS, bucketIndex, padBatch } from "../../src/engine/graphs.ts";
import { createKVCache } from "../../src/kv/cache.ts";
import { BatchBuilder } from "../../src/model/batch.ts";
import { loadModel } from "../../src/model/registry.ts";
import { SEED, randF32 } from "../helpers/random.ts";
import { GPU, gpuTest } from "../helpers/gpu.ts";


let gpu: CudaBackend;
beforeAll(async () => {
  if (!GPU) return;
  const { CudaBackend } = await import("../../src/backend/cuda.ts");
  gpu = CudaBackend.create();
});
afterAll(() => gpu?.close());

function read(p: Ptr, count: number): Float32Array {
  const a = new Float32Array(count);
  gpu.download(a, p);
  return a;
}
function expectBits(label: string, got: Float32Array, want: Float32Array): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    if (!Object.is(got[i], want[i])) throw new Error(`${label}: index ${i}: graph ${got[i]}, plain ${want[i]}; SEED=${SEED}`);
  }
}

gpuTest("a replayed graph computes the plain ops' result on each step's new inputs; a different step is refused", () => {
  const [n, k, m] = [20, 256, 96];
  const x = gpu.alloc(n * k * 4).ptr;
  const w = gpu.alloc(m * k * 2).ptr;
  const y = gpu.alloc(n * m * 4).ptr;
  const weights = new Uint16Array(m * k).map(() => 0x3000 + Math.floor(Math.random() * 0x800)); // f16 in [0.125, 0.25)
  gpu.upload(w, weights);
  // One step: y = x W^T (on tensor cores), y += y, softmax of y's rows.
  const step = () => {
    gpu.matmul(x, n, k, w, DType.F16, m, 0, y);
    gpu.add(y, y, n * m);
    gpu.softmax(y, n, m, 1.5);
  };
  const plain = (input: Float32Array) => {
    gpu.upload(x, input);
    step();
    return read(y, n * m);
  };
  const graphed = (input: Float32Array) => {
    gpu.upload(x, input);
    gpu.graphBegin(7);
    step();
    const out = read(y, n * m); // the first download ends the region: the graph runs here
    gpu.graphEnd(1);
    return out;
  };
  for (let s = 0; s < 4; s++) {
    const input = randF32(n * k);
    // s = 0 captures, then replays; each against the ops run without a graph.
    expectBits(`step ${s}`, graphed(input), plain(input));
  }

  // Another shape under the same key: refused at its first op, nothing runs.
  gpu.upload(x, randF32(n * k));
  gpu.graphBegin(7);
  expect(() => gpu.matmul(x, n - 1, k, w, DType.F16, m, 0, y)).toThrow(/differs from the capture/);
  gpu.graphEnd(0);
  gpu.graphDrop(7);
  const input = randF32(n * k);
  expectBits("after the drop", graphed(input), plain(input));
  gpu.graphDrop(-1);
});

gpuTest("graph regions: begin twice without end is refused; a negative key is refused", () => {
  gpu.graphBegin(1);
  expect(() => gpu.graphBegin(2)).toThrow(BackendError);
  gpu.graphEnd(0);
  expect(() => gpu.graphBegin(-3)).toThrow(/key=-3/);
});

gpuTest("trained pair on the GPU: StepGraphs logits equal the plain forward's over several steps as the bucket changes", () => {
  const llm = loadModel(join(import.meta.dir, "..", "..", "models", "llama-shakespeare-8m"), gpu, { maxBatchTokens: 128 });
  const kv = createKVCache(llm, { maxSeqs: 2, maxSeqLen: 512 });
  const graphs = new StepGraphs(llm);
  try {
    const row = kv.openSequence();
    kv.reserve(row, 400);
    let committed = 0;
    // Chains of these lengths in turn: buckets 1, 4, 15, 16, 24, 48 and back, each seen 3+ times.
    const lengths = [1, 3, 13, 16, 20, 40, 1, 13, 3, 16, 20, 40, 1, 13, 3, 16, 20, 40, 2];
    for (const len of lengths) {
      const b = new BatchBuilder(llm.maxWords);
      b.addChain(row, committed, Array.from({ length: len }, (_, i) => 5 + ((committed + i) % 400)), committed, "all");
      const batch = b.build();
      const bucket = TOKEN_BUCKETS[bucketIndex(TOKEN_BUCKETS, len)]!;
      const want = llm.forward(padBatch(batch, bucket, bucket, Math.ceil(bucket / 32)), kv).slice(0, len * llm.config.vocabSize);
      const got = graphs.run(batch, kv).host();
      expectBits(`chain of ${len} at ${committed}`, got, want);
      kv.commitPrefix(row, len);
      committed += len;
    }
    expect(graphs.stats.captured).toBeGreaterThanOrEqual(5);
    expect(graphs.stats.replayed).toBeGreaterThanOrEqual(5);
  } finally {
    gpu.graphDrop(-1);
    kv.close();
    llm.close();
  }
});

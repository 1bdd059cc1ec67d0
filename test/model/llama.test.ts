// The forward pass against an independent float64 reference, across file formats,
// dtypes, batch compositions and tree-shaped masks.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType } from "../../src/backend/backend";
import { CpuBackend } from "../../src/backend/cpu";
import { BatchBuilder } from "../../src/model/batch";
import type { CausalLM } from "../../src/model/causal-lm";
import { loadModel } from "../../src/model/registry";
import { createEngine } from "../../src/engine/core";
import { referenceForward } from "../helpers/reference-llama";
import { writeTinyModel, type TinyDims, type TinyModelOptions } from "../helpers/tiny-model";
import { createKVCache } from "../../src/kv/cache";
import { chainLogits, maxRelError } from "../helpers/forward";

const backend = CpuBackend.create({ threads: 2 });
let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "specinfer-llama-"));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

const DIMS: TinyDims = { vocab: 96, hidden: 64, intermediate: 96, layers: 2, heads: 4, kvHeads: 2 };
let counter = 0;

function tiny(opts: Partial<TinyModelOptions> & Pick<TinyModelOptions, "dtype" | "format">) {
  const sub = join(dir, `m${counter++}`);
  const written = writeTinyModel(sub, { seed: 7, dims: DIMS, ...opts });
  return { ...written, model: loadModel(written.path, backend, { maxBatchTokens: 128 }) };
}

const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];

// Over an F32 cache: these measure the weights' precision (test/kv/cache.test.ts bounds
// the f16 cache's rounding).
describe("forward vs float64 reference", () => {
  for (const [dtype, format, tol] of [
    ["F32", "safetensors", 1e-4],
    ["F32", "gguf", 1e-4],
    ["F16", "safetensors", 1e-4],
    ["BF16", "safetensors", 1e-4],
    ["Q8_0", "gguf", 2e-2],
    ["Q4_0", "gguf", 2e-2],
  ] as const) {
    test(`${dtype} ${format}: relative logit error <= ${tol}`, () => {
      const m = tiny({ dtype, format });
      const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), referenceForward(m.config, m.weights, PROMPT));
      m.model.close();
      expect(err).toBeLessThanOrEqual(tol);
    });
  }

  test("Qwen2-style q/k/v biases and tied embeddings match the reference", () => {
    const m = tiny({ dtype: "F32", format: "safetensors", attentionBias: true, tied: true });
    const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), referenceForward(m.config, m.weights, PROMPT));
    m.model.close();
    expect(err).toBeLessThanOrEqual(1e-4);
  });

  test("Llama-3 rope scaling matches the reference", () => {
    const ropeScaling = { type: "llama3" as const, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8 };
    const m = tiny({ dtype: "F32", format: "gguf", ropeScaling, ropeTheta: 500000 });
    const err = maxRelError(chainLogits(m.model, PROMPT, DType.F32), referenceForward(m.config, m.weights, PROMPT));
    m.model.close();
    expect(err).toBeLessThanOrEqual(1e-4);
  });
});

describe("formats agree", () => {
  test("HF safetensors and GGUF forms of the same weights give the same logits and greedy tokens", () => {
    const hf = tiny({ dtype: "F16", format: "safetensors" });
    const gguf = tiny({ dtype: "F16", format: "gguf" });
    const a = chainLogits(hf.model, PROMPT);
    const b = chainLogits(gguf.model, PROMPT);
    expect(maxRelError(a, b.map((r) => Float64Array.from(r)))).toBeLessThan(1e-5);
    const greedy = (m: CausalLM) => {
      const engine = createEngine(m, { maxRequestsPerBatch: 1 });
      const r = engine.submit(PROMPT, { maxNewTokens: 20, ignoreEos: true });
      engine.runUntilDone();
      engine.close();
      return r.generated;
    };
    expect(greedy(gguf.model)).toEqual(greedy(hf.model));
    hf.model.close();
    gguf.model.close();
  });
});

describe("batching", () => {
  test("several sequences in one batch get exactly the logits each gets alone", () => {
    const m = tiny({ dtype: "Q8_0", format: "gguf" });
    const prompts = [PROMPT, [1, 3, 4], [1, 90, 91, 92, 93, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]];
    const alone = prompts.map((p) => chainLogits(m.model, p));
    const kv = createKVCache(m.model, { maxSeqs: 3, maxSeqLen: 64 });
    const b = new BatchBuilder(m.model.maxWords);
    for (const p of prompts) {
      const row = kv.openSequence();
      kv.reserve(row, p.length);
      b.addChain(row, 0, p, 0, "all");
    }
    const together = m.model.forward(b.build(), kv);
    kv.close();
    const V = m.config.vocabSize;
    let offset = 0;
    prompts.forEach((p, s) => {
      for (let t = 0; t < p.length; t++, offset++) {
        expect(Array.from(together.subarray(offset * V, (offset + 1) * V))).toEqual(Array.from(alone[s][t]));
      }
    });
    m.model.close();
  });

  test("a token tree gives every node exactly the logits of its path fed as a chain", () => {
    const m = tiny({ dtype: "F16", format: "gguf" });
    const prefix = PROMPT.slice(0, 6);
    // Tree after the prefix, parents before children:  a(0) -> b(1) -> c(2);  a -> d(3);  e(4)
    const nodes = [
      { token: 40, parent: -1 },
      { token: 41, parent: 0 },
      { token: 42, parent: 1 },
      { token: 43, parent: 0 },
      { token: 44, parent: -1 },
    ];
    const kv = createKVCache(m.model, { maxSeqs: 1, maxSeqLen: 64 });
    const row = kv.openSequence();
    kv.reserve(row, prefix.length);
    const pre = new BatchBuilder(m.model.maxWords);
    pre.addChain(row, 0, prefix, 0, "none");
    m.model.forward(pre.build(), kv);
    kv.commit(row, prefix.map((_, i) => i));
    kv.reserve(row, nodes.length);
    const tree = new BatchBuilder(m.model.maxWords);
    const depth: number[] = [];
    nodes.forEach((n, i) => {
      depth[i] = n.parent < 0 ? 0 : depth[n.parent] + 1;
      tree.add(row, prefix.length, n.token, prefix.length + depth[i], n.parent, true);
    });
    const treeLogits = m.model.forward(tree.build(), kv).slice();
    kv.close();
    const V = m.config.vocabSize;
    nodes.forEach((n, i) => {
      const path: number[] = [];
      for (let j = i; j >= 0; j = nodes[j].parent) path.unshift(nodes[j].token);
      const chain = chainLogits(m.model, [...prefix, ...path]);
      const want = chain[chain.length - 1];
      const got = treeLogits.subarray(i * V, (i + 1) * V);
      let diff = 0;
      for (let v = 0; v < V; v++) diff = Math.max(diff, Math.abs(got[v] - want[v]));
      expect(diff).toBeLessThan(1e-4);
    });
    m.model.close();
  });
});

describe("the vendored trained pair", () => {
  const root = join(import.meta.dir, "..", "..", "models");
  const reference = JSON.parse(readFileSync(join(root, "reference-greedy.json"), "utf8")) as {
    input_ids: number[];
    target_greedy: number[];
    draft_greedy: number[];
  }[];

  function greedy(path: string, prompt: number[], n: number): number[] {
    const model = loadModel(path, backend, { maxBatchTokens: 128 });
    const engine = createEngine(model, { maxRequestsPerBatch: 1 });
    const r = engine.submit(prompt, { maxNewTokens: n, ignoreEos: true });
    engine.runUntilDone();
    engine.close();
    model.close();
    return r.generated;
  }

  for (const [name, key] of [["llama-shakespeare-8m", "target_greedy"], ["llama-shakespeare-1.4m-draft", "draft_greedy"]] as const) {
    test(`${name}: safetensors and GGUF give the same 64-token greedy continuation, equal to PyTorch's first 32`, () => {
      const prompt = reference[0].input_ids;
      const fromSafetensors = greedy(join(root, name), prompt, 64);
      const fromGGUF = greedy(join(root, name, "model.gguf"), prompt, 64);
      expect(fromGGUF).toEqual(fromSafetensors);
      expect(fromSafetensors.slice(0, 32)).toEqual(reference[0][key]);
    });
  }
});

// Tensor parallelism on the CPU: N backend contexts, each with its own thread, act as N
// devices. A split model's logits must equal the unsplit model's to float rounding (the
// only change is the order of the all-reduced sums), over chains, trees of several
// sequences and KV commits; shapes that cannot split are refused with their numbers;
// and greedy speculative output with the LLM split equals incremental output without
// it, on the trained pair widened so that its heads split.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DType } from "../../src/backend/backend";
import { CpuBackend } from "../../src/backend/cpu";
import { DeviceGroup } from "../../src/backend/group";
import { createEngine, type Engine } from "../../src/engine/core";
import { createKVCache } from "../../src/kv/cache";
import { BatchBuilder } from "../../src/model/batch";
import type { CausalLM } from "../../src/model/causal-lm";
import { LlamaModel } from "../../src/model/llama";
import { loadModel } from "../../src/model/registry";
import { widenModel } from "../../src/model/widen";
import { Runtime } from "../../src/runtime/load";
import { DEFAULT_DRAFT, DEFAULT_MODEL } from "../../src/runtime/paths";
import { createSpeculator } from "../../src/speculation/speculator";
import { chainLogits, maxRelError } from "../helpers/forward";
import { writeTinyModel, type TinyDims, type TinyModelOptions } from "../helpers/tiny-model";

const dir = mkdtempSync(join(tmpdir(), "specinfer-tp-"));
const single = CpuBackend.create({ threads: 1 });
afterAll(() => {
  single.close();
  rmSync(dir, { recursive: true, force: true });
});

/** `n` CPU contexts of one thread each; the first `tp` hold the split LLM. */
function cpuGroup(tp: number, n = tp): DeviceGroup {
  return new DeviceGroup(Array.from({ length: n }, () => CpuBackend.create({ threads: 1 })), tp);
}

// 8 query heads sharing 4 KV heads (GQA), head dim 32: a rank's slice of O's and down's
// inputs is whole Q8_0 blocks for 2 and 4 ranks.
const DIMS: TinyDims = { vocab: 96, hidden: 128, intermediate: 256, layers: 2, heads: 8, kvHeads: 4, headDim: 32 };
const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];
let count = 0;

function tiny(opts: Partial<TinyModelOptions> & Pick<TinyModelOptions, "dtype" | "format">): string {
  return writeTinyModel(join(dir, `m${count++}`), { seed: 11, dims: DIMS, ...opts }).path;
}

describe("split logits equal the unsplit model's", () => {
  for (const [dtype, format] of [["F32", "safetensors"], ["F16", "gguf"], ["Q8_0", "gguf"]] as const) {
    const path = tiny({ dtype, format });
    const alone = loadModel(path, single, { maxBatchTokens: 64 });
    const want = chainLogits(alone, PROMPT, DType.F32);
    alone.close();
    for (const tp of [2, 4]) {
      test(`${dtype} ${format}, --tp ${tp}: chain logits within float rounding`, () => {
        const group = cpuGroup(tp);
        const split = loadModel(path, group, { maxBatchTokens: 64 });
        const got = chainLogits(split, PROMPT, DType.F32);
        split.close();
        group.close();
        expect(maxRelError(got, want)).toBeLessThan(1e-5);
      });
    }
  }

  test("Qwen2 q/k/v biases are split with their rows (--tp 2)", () => {
    const path = tiny({ dtype: "F32", format: "safetensors", attentionBias: true });
    const alone = loadModel(path, single, { maxBatchTokens: 64 });
    const want = chainLogits(alone, PROMPT, DType.F32);
    alone.close();
    const group = cpuGroup(2);
    const split = loadModel(path, group, { maxBatchTokens: 64 });
    expect(maxRelError(chainLogits(split, PROMPT, DType.F32), want)).toBeLessThan(1e-5);
    split.close();
    group.close();
  });

  /** Prefill of two sequences, then a tree per sequence, a commit of one branch each
   *  (K/V rows move on every device) and a decode step: every logit row. */
  function treeSession(model: CausalLM): Float32Array[] {
    const kv = createKVCache(model, { maxSeqs: 2, maxSeqLen: 64, dtype: DType.F32 });
    const rows = [kv.openSequence(), kv.openSequence()];
    const prompts = [PROMPT, PROMPT.slice(3, 10)];
    const out: Float32Array[] = [];
    const run = (b: BatchBuilder) => out.push(model.forward(b.build(), kv).slice());
    let b = new BatchBuilder(model.maxWords);
    rows.forEach((row, i) => {
      kv.reserve(row, prompts[i]!.length);
      b.addChain(row, 0, prompts[i]!, 0, "last");
    });
    run(b);
    rows.forEach((row, i) => kv.commitPrefix(row, prompts[i]!.length));
    // Tree: root -> (a, b), a -> c.
    b = new BatchBuilder(model.maxWords);
    for (const row of rows) {
      const at = kv.committed(row);
      kv.reserve(row, 4);
      const root = b.add(row, at, 7, at, -1, true);
      const a = b.add(row, at, 19, at + 1, root, true);
      b.add(row, at, 23, at + 1, root, true);
      b.add(row, at, 31, at + 2, a, true);
    }
    run(b);
    // Keep root, b (not contiguous: slot 2 moves to 1).
    for (const row of rows) kv.commit(row, [kv.committed(row), kv.committed(row) + 2]);
    b = new BatchBuilder(model.maxWords);
    for (const row of rows) {
      kv.reserve(row, 1);
      b.addChain(row, kv.committed(row), [44], kv.committed(row), "last");
    }
    run(b);
    for (const row of rows) kv.closeSequence(row);
    expect(kv.freeBlocks).toBe(kv.totalBlocks);
    kv.close();
    return out;
  }

  test("trees over two sequences with KV commits: split (--tp 4, KV heads 1 per device) == unsplit", () => {
    const path = tiny({ dtype: "F16", format: "safetensors" });
    const alone = loadModel(path, single, { maxBatchTokens: 64 });
    const want = treeSession(alone);
    alone.close();
    const group = cpuGroup(4);
    const split = loadModel(path, group, { maxBatchTokens: 64 });
    const kv = createKVCache(split, { maxSeqs: 1, maxSeqLen: 16 });
    expect(kv.devices).toBe(4);
    kv.close();
    const got = treeSession(split);
    split.close();
    group.close();
    expect(maxRelError(got, want)).toBeLessThan(1e-5);
  });

  test("tensorParallel 1 builds the plain single-device model", () => {
    const group = cpuGroup(1, 2);
    const m = loadModel(tiny({ dtype: "F32", format: "gguf" }), group);
    expect(m).toBeInstanceOf(LlamaModel);
    expect(m.shards).toBeUndefined();
    m.close();
    group.close();
  });

  test("a split model refuses a KV cache made for another device count", () => {
    const path = tiny({ dtype: "F32", format: "gguf" });
    const group = cpuGroup(2);
    const split = loadModel(path, group, { maxBatchTokens: 16 });
    const plain = createKVCache({ backend: single, config: split.config }, { maxSeqs: 1, maxSeqLen: 16 });
    const row = plain.openSequence();
    plain.reserve(row, 1);
    const b = new BatchBuilder(split.maxWords);
    b.addChain(row, 0, [3], 0, "last");
    expect(() => split.forward(b.build(), plain)).toThrow("split over 2 devices but its KV cache over 1");
    plain.close();
    split.close();
    group.close();
  });
});

describe("shapes that cannot split are refused", () => {
  function refusal(opts: Partial<TinyModelOptions> & Pick<TinyModelOptions, "dtype" | "format">, tp: number): string {
    const path = writeTinyModel(join(dir, `m${count++}`), { seed: 3, dims: DIMS, ...opts }).path;
    const group = cpuGroup(tp);
    try {
      loadModel(path, group).close();
      return "loaded";
    } catch (e) {
      return (e as Error).message;
    } finally {
      group.close();
    }
  }

  test("query heads that do not divide", () => {
    expect(refusal({ dtype: "F32", format: "gguf", dims: { ...DIMS, heads: 6, kvHeads: 6, headDim: 16 } }, 4)).toBe(
      "tensor parallelism over 4 devices: the model's 6 attention heads do not divide by 4",
    );
  });

  test("GQA KV heads that do not divide", () => {
    expect(refusal({ dtype: "F32", format: "gguf", dims: { ...DIMS, kvHeads: 2 } }, 4)).toBe(
      "tensor parallelism over 4 devices: the model's 2 KV heads (GQA: 8 query heads share 2 KV heads) do not divide by 4",
    );
  });

  test("MLP neurons that do not divide", () => {
    expect(refusal({ dtype: "F32", format: "gguf", dims: { ...DIMS, intermediate: 250 } }, 4)).toContain("250 MLP neurons (intermediate size) do not divide by 4");
  });

  test("a Q8_0 row-parallel slice that would cut a block names the tensor and the numbers", () => {
    // O reads 4 heads x 24 = 96 inputs: 48 per device is not whole 32-element blocks.
    const msg = refusal({ dtype: "Q8_0", format: "gguf", dims: { ...DIMS, hidden: 64, heads: 4, kvHeads: 2, headDim: 24 } }, 2);
    expect(msg).toBe(
      "tensor parallelism over 2 devices: cannot split model.layers.0.self_attn.o_proj.weight: it is Q8_0 with 96 input columns: 48 per device is not a whole number of 32-element blocks",
    );
  });

  test("families without a split are refused by name", () => {
    const msg = refusal({ family: "starcoder", dtype: "F32", format: "safetensors", dims: { ...DIMS, kvHeads: 1, headDim: 16 } }, 2);
    expect(msg).toBe("tensor parallelism: starcoder models cannot be split over devices yet (supported: llama, mistral, qwen2); load it with tensorParallel 1");
  });
});

describe("greedy speculation with the LLM split", () => {
  // The trained target has 6 heads / 2 KV heads: widened x2 (12 / 4), it splits over 2
  // and 4 devices; its FFN (896) too.
  const target = join(dir, "target-heads-x2.gguf");
  widenModel(DEFAULT_MODEL, target, { width: 1, heads: 2, ffn: 1 }, { dtype: "F16", tokenizerFrom: join(DEFAULT_MODEL, "model.gguf") });
  const prompts: number[][] = (JSON.parse(readFileSync(join(DEFAULT_MODEL, "..", "reference-greedy.json"), "utf8")) as { input_ids: number[] }[])
    .slice(0, 3)
    .map((r) => r.input_ids);
  /** Tokens per request, and the drafted tokens the LLM accepted over all requests. */
  const run = (engine: Engine) => {
    const reqs = prompts.map((p) => engine.submit(p, { maxNewTokens: 32, ignoreEos: true }));
    engine.runUntilDone();
    return { tokens: reqs.map((r) => r.generated), accepted: reqs.reduce((s, r) => s + r.stats.acceptedTokens, 0) };
  };
  const alone = loadModel(target, single, { maxBatchTokens: 256 });
  const incremental = createEngine(alone, { maxRequestsPerBatch: 3 });
  const want = run(incremental).tokens;
  incremental.close();
  alone.close();

  for (const tp of [2, 4]) {
    test(`--tp ${tp} with the SSM on its own device: speculative output == incremental output without TP`, () => {
      const group = cpuGroup(tp, tp + 1);
      const llm = loadModel(target, group, { maxBatchTokens: 256 });
      const ssm = loadModel(DEFAULT_DRAFT, group.devices[tp]!, { maxBatchTokens: 256 });
      const engine = createEngine(llm, { maxRequestsPerBatch: 3, speculator: createSpeculator(llm, 3, { ssms: [ssm], tree: "1,1,3,1,1", ngram: false }) });
      const got = run(engine);
      engine.close();
      ssm.close();
      llm.close();
      group.close();
      expect(got.tokens).toEqual(want);
      expect(got.accepted).toBeGreaterThan(20); // the drafts were used, not just the bonus tokens
    });
  }

  test("{ tensorParallel: 2, ssmDevice: 2 }: the runtime splits the LLM over devices 0-1 and drafts on a device of its own, overlapped", async () => {
    const runtime = await Runtime.load({ model: target, ssms: [DEFAULT_DRAFT], tensorParallel: 2, ssmDevice: 2, threads: 1, measure: false, maxRequestsPerBatch: 3 });
    try {
      expect(runtime.group.devices.length).toBe(2);
      expect(runtime.engine.kv.devices).toBe(2);
      expect(runtime.engine.speculator?.concurrent).toBe(true);
      const reqs = prompts.map((p) => runtime.engine.submit(p, { maxNewTokens: 32, ignoreEos: true, speculation: { tree: "1,1,3,1,1" } }));
      runtime.engine.runUntilDone();
      expect(reqs.map((r) => r.generated)).toEqual(want);
    } finally {
      runtime.close();
    }
  });

  test("bad tensorParallel and ssmDevice values are refused by name", async () => {
    await expect(Runtime.load({ model: target, ssms: [], tensorParallel: 0, measure: false })).rejects.toThrow("tensorParallel must be a positive integer, got 0");
    await expect(Runtime.load({ model: target, ssms: [], ssmDevice: -1, measure: false })).rejects.toThrow("ssmDevice must be a non-negative integer, got -1");
  });

  describe("command line", () => {
    const CLI = join(import.meta.dir, "..", "..", "src", "cli.ts");
    async function cli(args: string[]) {
      const proc = Bun.spawn([process.execPath, CLI, ...args], { stdout: "pipe", stderr: "pipe", stdin: "ignore" });
      const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
      return { stdout, stderr, code };
    }
    const GREEDY = ["--prompt", "ROMEO:", "--max-tokens", "24", "--temperature", "0", "--json", "--threads", "1"];

    test("generate --tp 2 --ssm-device 2 speculates and gives the plain unsplit tokens", async () => {
      const split = await cli(["generate", "--model", target, "--ssm", DEFAULT_DRAFT, "--tp", "2", "--ssm-device", "2", "--speculation", "fixed", "--tree", "1,1,3,1,1", ...GREEDY]);
      expect(split.stderr).not.toContain("error");
      expect(split.code).toBe(0);
      const plain = await cli(["generate", "--model", target, "--no-spec", ...GREEDY]);
      const [a, b] = [JSON.parse(split.stdout), JSON.parse(plain.stdout)];
      expect(a.tokens).toEqual(b.tokens);
      expect(a.stats.acceptedTokens).toBeGreaterThan(0);
    });

    test("generate --tp 4 on the 6-head trained model fails with the numbers; --tp 0 is a usage error", async () => {
      const uneven = await cli(["generate", "--model", DEFAULT_MODEL, "--no-spec", "--tp", "4", ...GREEDY]);
      expect(uneven.code).not.toBe(0);
      expect(uneven.stderr).toContain("tensor parallelism over 4 devices: the model's 6 attention heads do not divide by 4");
      const zero = await cli(["generate", "--no-spec", "--tp", "0", ...GREEDY]);
      expect(zero.code).not.toBe(0);
      expect(zero.stderr).toContain("--tp must be an integer >= 1");
    });
  });
});

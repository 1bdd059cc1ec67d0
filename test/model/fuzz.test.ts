// The model-file fuzzer (fuzz-runner.ts) over a few thousand seeded cases, its judge,
// and the faults it found, each kept as a named case with the smallest input.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ModelFormatError } from "../../src/model/errors.ts";
import { loadModelFiles } from "../../src/model/load.ts";
import { readSafetensors } from "../../src/model/safetensors.ts";
import { encodeSafetensors } from "../../src/model/write.ts";
import { loadTokenizer } from "../../src/tokenizer/index.ts";
import { bytesMapped, readMapped } from "../helpers/mapped.ts";
import { writeSeedModels, type SeedModel } from "./fuzz-corpus.ts";
import { ggufLayout, layoutOf, materialize } from "./fuzz-mutate.ts";
import { CASE_TIME_LIMIT_MS, FuzzWorker, runFuzz, verdict } from "./fuzz-runner.ts";

const tmp = mkdtempSync(join(tmpdir(), "specinfer-fuzz-test-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let count = 0;
/** Fresh copies of the seed models, to damage by hand. */
const freshSeeds = (): Record<string, SeedModel> =>
  Object.fromEntries(writeSeedModels(join(tmp, `s${count++}`)).map((s) => [s.name, s]));

describe("fuzzer", () => {
  test("3000 mutated model files each load and run a forward, or are refused naming the file", async () => {
    const started = performance.now();
    const stats = await runFuzz({ seed: 20261203, cases: 3000 });
    console.log(`fuzz: ${stats.cases} cases in ${((performance.now() - started) / 1000).toFixed(1)} s, ${stats.loaded} loaded, ${stats.refused} refused, ${stats.reasons.size} kinds of refusal, peak memory at most ${stats.maxExcessGrowth} bytes beyond the files`);
    // Both outcomes are common and the refusals varied: the mutations reach past the
    // first check of each format.
    expect(stats.loaded).toBeGreaterThan(300);
    expect(stats.refused).toBeGreaterThan(1500);
    expect(stats.reasons.size).toBeGreaterThan(40);
  }, 240_000);

  test("every cut at a structural boundary of every seed file is refused, naming the file", () => {
    const seeds = writeSeedModels(join(tmp, "cuts"));
    let cuts = 0;
    seeds.forEach((seed, s) => {
      seed.files.forEach((name, f) => {
        const { boundaries } = layoutOf(name, new Uint8Array(readFileSync(join(seed.dir, name))));
        const size = statSync(join(seed.dir, name)).size;
        for (const at of new Set(boundaries)) {
          if (at >= size) continue;
          const truncate = { op: "truncate" as const, file: f, boundary: boundaries.indexOf(at), delta: 0 };
          const { path } = materialize({ seed: s, mutations: [truncate] }, seeds, join(tmp, "cut"));
          const isTokenizer = name.startsWith("tokenizer");
          let error: unknown;
          try {
            if (isTokenizer) loadTokenizer({ path });
            else loadModelFiles(path, readMapped).close();
          } catch (e) {
            error = e;
          }
          const where = `${seed.name}/${name} cut at ${at}`;
          expect(error, where).toBeInstanceOf(isTokenizer ? Error : ModelFormatError);
          expect((error as Error).message, where).toContain(name);
          cuts++;
        }
      });
    });
    expect(cuts).toBeGreaterThan(2000);
  });

  test("a worker killed by a signal or spinning is reported, and the next case runs in a fresh one", async () => {
    const worker = new FuzzWorker(1000);
    const seed = freshSeeds()["gguf-llama-q8"]!;
    try {
      const crashed = await worker.selfTest("crash");
      expect(crashed.outcome).toBe("crashed");
      expect((crashed as { detail: string }).detail).toContain("signal SIGSEGV");
      expect((await worker.run(seed.path)).outcome).toBe("loaded");
      expect((await worker.selfTest("hang")).outcome).toBe("hung");
      expect((await worker.run(seed.path)).outcome).toBe("loaded");
    } finally {
      worker.stop();
    }
  }, 30_000);

  const files = { path: "/m", mutated: ["config.json"], bytes: 1000 };
  test("the judge fails crashes, hangs, memory growth and vague errors", () => {
    expect(verdict(files, { outcome: "crashed", detail: "worker died (exit 139, signal SIGSEGV)" })).toContain("SIGSEGV");
    expect(verdict(files, { outcome: "hung" })).toContain(`${CASE_TIME_LIMIT_MS} ms`);
    expect(verdict(files, { outcome: "loaded", peakGrowth: 1 << 30 })).toContain("memory grew");
    const threw = { outcome: "threw" as const, peakGrowth: 0 };
    expect(verdict(files, { ...threw, stage: "model", errorName: "RangeError", message: "/m/config.json: offset" })).toContain("not a ModelFormatError");
    expect(verdict(files, { ...threw, stage: "model", errorName: "ModelFormatError", message: "/m/model.safetensors: bad" })).toContain("does not name config.json");
    expect(verdict(files, { ...threw, stage: "forward", errorName: "Error", message: "/m/config.json: x" })).toContain("loaded, then failed");
    expect(verdict(files, { ...threw, stage: "tokenizer", errorName: "TypeError", message: "x is undefined" })).toContain("does not name");
  });

  test("the judge passes a load, and a refusal naming a mutated file", () => {
    expect(verdict(files, { outcome: "loaded", peakGrowth: 1 << 20 })).toBeNull();
    const message = "/m/model.safetensors: tensor x has shape [2], config.json says [3]";
    expect(verdict(files, { outcome: "threw", stage: "model", errorName: "ModelFormatError", message, peakGrowth: 0 })).toBeNull();
  });
});

/** Runs `fn`, which must throw within `ms` an error whose message names `file` and matches `pattern`. */
function expectRefusedQuickly(fn: () => unknown, file: string, pattern: string | RegExp, ms = 1000): Error {
  const started = performance.now();
  let error: unknown;
  try {
    fn();
  } catch (e) {
    error = e;
  }
  expect(performance.now() - started).toBeLessThan(ms);
  expect(error).toBeInstanceOf(Error);
  const message = (error as Error).message;
  expect(message).toContain(file);
  if (typeof pattern === "string") expect(message).toContain(pattern);
  else expect(message).toMatch(pattern);
  return error as Error;
}

const loadFiles = (path: string) => loadModelFiles(path, readMapped);

describe("faults the fuzzer found", () => {
  test("a GGUF layer count of 2^27 is refused at once, not enumerated", () => {
    const seed = freshSeeds()["gguf-llama-q8"]!;
    const bytes = new Uint8Array(readFileSync(seed.path));
    const keyAt = Buffer.from(bytes).indexOf("llama.block_count");
    // The key's bytes, then its u32 value type, then the u32 value.
    const valueAt = keyAt + "llama.block_count".length + 4;
    expect(ggufLayout(bytes).fields.some((f) => f.at === valueAt && f.kind === "scalar")).toBe(true);
    new DataView(bytes.buffer).setUint32(valueAt, 0x08000002, true);
    writeFileSync(seed.path, bytes);
    const e = expectRefusedQuickly(() => loadFiles(seed.path), seed.path, "missing tensor model.layers.2.input_layernorm.weight (GGUF metadata asks for it)");
    expect(e).toBeInstanceOf(ModelFormatError);
  });

  test("config.json's num_hidden_layers of 10^9 is refused at once", () => {
    const seed = freshSeeds()["hf-llama-f32"]!;
    const configPath = join(seed.dir, "config.json");
    writeFileSync(configPath, JSON.stringify({ ...JSON.parse(readFileSync(configPath, "utf8")), num_hidden_layers: 1e9 }));
    expectRefusedQuickly(() => loadFiles(seed.path), seed.path, "missing tensor model.layers.2.input_layernorm.weight (config.json asks for it)");
  });

  test("untying a tied model in config.json names config.json", () => {
    const seed = freshSeeds()["hf-qwen2-f16-sharded-tied"]!;
    const configPath = join(seed.dir, "config.json");
    writeFileSync(configPath, JSON.stringify({ ...JSON.parse(readFileSync(configPath, "utf8")), tie_word_embeddings: false }));
    expectRefusedQuickly(() => loadFiles(seed.path), "model.safetensors.index.json", "missing tensor lm_head.weight (config.json asks for it)");
  });

  test("an index that places a tensor in the wrong shard, or names a missing shard, is named", () => {
    const seed = freshSeeds()["hf-qwen2-f16-sharded-tied"]!;
    const indexPath = join(seed.dir, "model.safetensors.index.json");
    const index = JSON.parse(readFileSync(indexPath, "utf8"));
    const name = "model.layers.0.self_attn.k_proj.bias";
    expect(index.weight_map[name]).toBe("model-00001-of-00002.safetensors");
    writeFileSync(indexPath, JSON.stringify({ ...index, weight_map: { ...index.weight_map, [name]: "model-00002-of-00002.safetensors" } }));
    expectRefusedQuickly(
      () => loadFiles(seed.path), "model-00001-of-00002.safetensors",
      `tensor ${name} is in this shard, but model.safetensors.index.json lists it in model-00002-of-00002.safetensors`,
    );
    const renamed = Object.fromEntries(Object.entries(index.weight_map).map(([t, shard]) => [t, String(shard).replace("-of", "=of")]));
    writeFileSync(indexPath, JSON.stringify({ ...index, weight_map: renamed }));
    expectRefusedQuickly(() => loadFiles(seed.path), "model-00001=of-00002.safetensors", "no such file or directory (a shard model.safetensors.index.json lists)");
  });

  test("an index naming an empty, 1 MB long or directory shard is refused naming the index", () => {
    const seed = freshSeeds()["hf-qwen2-f16-sharded-tied"]!;
    const indexPath = join(seed.dir, "model.safetensors.index.json");
    const index = JSON.parse(readFileSync(indexPath, "utf8"));
    const withShard = (shard: string) =>
      JSON.stringify({ ...index, weight_map: Object.fromEntries(Object.keys(index.weight_map).map((t) => [t, shard])) });
    writeFileSync(indexPath, withShard(""));
    expectRefusedQuickly(() => loadFiles(seed.path), indexPath, 'bad shard file name ""');
    // Longer than any file name can be (255 bytes): the message would have been 1 MB of path.
    writeFileSync(indexPath, withShard("a".repeat(1 << 20)));
    const e = expectRefusedQuickly(() => loadFiles(seed.path), indexPath, 'bad shard file name "aaa');
    expect(e.message.length).toBeLessThan(indexPath.length + 200);
    mkdirSync(join(seed.dir, "sub"));
    writeFileSync(indexPath, withShard("sub"));
    expectRefusedQuickly(() => loadFiles(seed.path), join(seed.dir, "sub"), "not a regular file (a shard model.safetensors.index.json lists)");
  });

  test("a config.json value nested 5000 deep or 1 MB long is refused with a short message, not a stack overflow", () => {
    const seed = freshSeeds()["hf-llama-f32"]!;
    const configPath = join(seed.dir, "config.json");
    const config = JSON.parse(readFileSync(configPath, "utf8"));
    const deep = "[".repeat(5000) + "]".repeat(5000);
    for (const key of ["architectures", "hidden_act", "vocab_size", "rope_scaling"]) {
      writeFileSync(configPath, JSON.stringify({ ...config, model_type: "none", [key]: "MARK" }).replace('"MARK"', deep));
      const e = expectRefusedQuickly(() => loadFiles(seed.path), configPath, /unsupported|must be/);
      expect(e.message.length).toBeLessThan(configPath.length + 200);
    }
    writeFileSync(configPath, JSON.stringify({ ...config, hidden_act: "x".repeat(1 << 20) }));
    const e = expectRefusedQuickly(() => loadFiles(seed.path), configPath, 'unsupported hidden_act "xxx');
    expect(e.message.length).toBeLessThan(configPath.length + 200);
  });

  test('names like "constructor" are not taken for architectures or dtypes (object prototype keys)', () => {
    const seed = freshSeeds()["hf-llama-f32"]!;
    const configPath = join(seed.dir, "config.json");
    const config = JSON.parse(readFileSync(configPath, "utf8"));
    writeFileSync(configPath, JSON.stringify({ ...config, architectures: ["constructor"], model_type: "toString" }));
    expectRefusedQuickly(() => loadFiles(seed.path), configPath, "unsupported architecture constructor");
    for (const dtype of ["constructor", "toString", "__proto__"]) {
      const bytes = encodeSafetensors([{ name: "w", dtype, shape: [2], data: new Uint8Array(8) }]);
      expectRefusedQuickly(() => readSafetensors(bytesMapped("p.safetensors", bytes)), "p.safetensors", `tensor w: unsupported dtype ${dtype}`);
    }
  });

  test("safetensors __metadata__ values must be strings (a nested one once overflowed the stack)", () => {
    const good = encodeSafetensors([{ name: "w", dtype: "F32", shape: [2], data: new Uint8Array(8) }]);
    const header = JSON.parse(new TextDecoder().decode(good.subarray(8, 8 + Number(new DataView(good.buffer).getBigUint64(0, true)))));
    const text = JSON.stringify({ __metadata__: { format: "MARK" }, ...header }).replace('"MARK"', "[".repeat(5000) + "]".repeat(5000));
    const body = new TextEncoder().encode(text);
    const bytes = new Uint8Array(8 + body.byteLength + 8);
    new DataView(bytes.buffer).setBigUint64(0, BigInt(body.byteLength), true);
    bytes.set(body, 8);
    expectRefusedQuickly(() => readSafetensors(bytesMapped("m.safetensors", bytes)), "m.safetensors", "__metadata__.format is not a string: [[[[");
  });

  describe("tokenizer files", () => {
    /** An HF seed whose tokenizer.json / tokenizer_config.json is edited by `edit`. */
    function withTokenizerFile(file: "tokenizer.json" | "tokenizer_config.json", edit: (json: any) => unknown): string {
      const seed = freshSeeds()["hf-llama-f32"]!;
      const path = join(seed.dir, file);
      writeFileSync(path, JSON.stringify(edit(JSON.parse(readFileSync(path, "utf8")))));
      return seed.dir;
    }
    const loadTok = (dir: string) => loadTokenizer({ path: dir });

    test("a tokenizer_config.json that is not an object names tokenizer_config.json", () => {
      const dir = withTokenizerFile("tokenizer_config.json", () => 0);
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer_config.json"), "not a JSON object");
    });

    test("a chat_template of the wrong type names tokenizer_config.json", () => {
      const dir = withTokenizerFile("tokenizer_config.json", (c) => ({ ...c, chat_template: 5 }));
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer_config.json"), "chat_template must be");
    });

    test("a vocabulary id of 1597825945 is refused at once (the library would walk a sparse array that long)", () => {
      const dir = withTokenizerFile("tokenizer.json", (t) => ({ ...t, model: { ...t.model, vocab: { ...t.model.vocab, i: 1597825945 } } }));
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer.json"), "token id 1597825945");
    });

    test("a vocabulary id that is a string is refused at load, not at encode", () => {
      const dir = withTokenizerFile("tokenizer.json", (t) => ({ ...t, model: { ...t.model, vocab: { ...t.model.vocab, e: "gelu" } } }));
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer.json"), 'token id "gelu"');
    });

    test("an unk_token missing from the vocabulary is refused at load (it encoded unknown text as undefined ids)", () => {
      const dir = withTokenizerFile("tokenizer.json", (t) => ({ ...t, model: { ...t.model, unk_token: "<tnk>" } }));
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer.json"), 'unk_token "<tnk>" is not in the vocabulary');
    });

    test("a 1 MB decoder pattern is refused at load (the library's regex of it took 265 MB)", () => {
      const dir = withTokenizerFile("tokenizer.json", (t) => {
        t.decoder.decoders[0].pattern.String = "a".repeat(1 << 20);
        return t;
      });
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer.json"), "decoder.decoders.0.pattern.String is 1048576 characters long (at most 4096)");
    });

    test("a post-processor the library checks only when encoding is refused at load", () => {
      const dir = withTokenizerFile("tokenizer.json", (t) => ({ ...t, post_processor: { ...t.post_processor, single: [0] } }));
      expectRefusedQuickly(() => loadTok(dir), join(dir, "tokenizer.json"), "unsupported or malformed tokenizer");
    });
  });
});

// loadTokenizer: which source it picks, and clear errors for missing or bad files.

import { afterAll, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ggufTokenizer, loadTokenizer } from "../../src/tokenizer/index.ts";
import { ggufMetadata, MODEL_DIR, MODEL_GGUF, MODELS } from "./helpers.ts";

const scratch = mkdtempSync(join(tmpdir(), "specinfer-tok-"));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

function dirWith(name: string, files: Record<string, string | { link: string }>): string {
  const dir = join(scratch, name);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir);
  for (const [file, content] of Object.entries(files)) {
    if (typeof content === "string") writeFileSync(join(dir, file), content);
    else symlinkSync(content.link, join(dir, file));
  }
  return dir;
}

const PROMPT = "ROMEO:\nBut soft, what light?";

test("a directory with tokenizer.json, a directory with only a .gguf, and a .gguf file agree", () => {
  const viaJson = loadTokenizer({ path: MODEL_DIR }).encode(PROMPT);
  const onlyGGUF = dirWith("only-gguf", { "model.gguf": { link: MODEL_GGUF } });
  expect(loadTokenizer({ path: onlyGGUF }).encode(PROMPT)).toEqual(viaJson);
  expect(loadTokenizer({ path: MODEL_GGUF }).encode(PROMPT)).toEqual(viaJson);
  const draft = join(MODELS, "llama-shakespeare-1.4m-draft");
  expect(loadTokenizer({ path: draft }).encode(PROMPT)).toEqual(viaJson);
});

test("metadata already read by the model loader is used instead of the file", () => {
  const onlyGGUF = dirWith("metadata", {});
  expect(loadTokenizer({ path: onlyGGUF, ggufMetadata }).encode(PROMPT)).toEqual(
    loadTokenizer({ path: MODEL_DIR }).encode(PROMPT),
  );
});

test("missing files give clear errors", () => {
  expect(() => loadTokenizer({ path: join(scratch, "nope") })).toThrow(/nope does not exist/);
  expect(() => loadTokenizer({ path: dirWith("empty", {}) })).toThrow(/has neither tokenizer\.json nor a \.gguf file/);
  const two = dirWith("two", { "a.gguf": { link: MODEL_GGUF }, "b.gguf": { link: MODEL_GGUF } });
  expect(() => loadTokenizer({ path: two })).toThrow(/several \.gguf files \(a\.gguf, b\.gguf\)/);
});

test("bad files give clear errors naming the file", () => {
  const badJson = dirWith("bad-json", { "tokenizer.json": "{ not json" });
  expect(() => loadTokenizer({ path: badJson })).toThrow(/bad-json\/tokenizer\.json is not valid JSON/);
  const badConfig = dirWith("bad-config", { "tokenizer.json": "{}", "tokenizer_config.json": "[" });
  expect(() => loadTokenizer({ path: badConfig })).toThrow(/tokenizer_config\.json is not valid JSON/);
  const truncated = join(scratch, "truncated.gguf");
  writeFileSync(truncated, readFileSync(MODEL_GGUF).subarray(0, 5000));
  expect(() => loadTokenizer({ path: truncated })).toThrow(/truncated\.gguf/);
  const empty = join(scratch, "empty.gguf");
  writeFileSync(empty, "");
  expect(() => loadTokenizer({ path: empty })).toThrow(/empty\.gguf: empty file/);
  expect(() => loadTokenizer({ path: join(MODEL_DIR, "config.json") })).toThrow(/config\.json: bad magic/);
});

test("GGUF metadata without a usable tokenizer is refused by key", () => {
  expect(() => ggufTokenizer(new Map(), "x.gguf")).toThrow(/x\.gguf: no tokenizer: tokenizer\.ggml\.model is missing/);
  expect(() => ggufTokenizer(new Map([["tokenizer.ggml.model", "bert"]]), "x.gguf")).toThrow(
    /tokenizer\.ggml\.model = "bert" is not supported \(supported: llama, gpt2\)/,
  );
  expect(() => ggufTokenizer(new Map([["tokenizer.ggml.model", "llama"]]), "x.gguf")).toThrow(
    /tokenizer\.ggml\.tokens is missing/,
  );
  const noScores = new Map<string, unknown>([
    ["tokenizer.ggml.model", "llama"],
    ["tokenizer.ggml.tokens", ["a", "b"]],
  ]);
  expect(() => ggufTokenizer(noScores, "x.gguf")).toThrow(/tokenizer\.ggml\.scores is missing/);
  noScores.set("tokenizer.ggml.scores", new Float32Array(2));
  noScores.set("tokenizer.ggml.bos_token_id", 7);
  expect(() => ggufTokenizer(noScores, "x.gguf")).toThrow(/bos_token_id = 7 is outside the vocabulary/);
});

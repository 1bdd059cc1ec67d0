// The specinfer command line, run as a user runs it: exit codes, one-line errors,
// JSON shapes, and the speculative default matching plain decoding.

import { describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const CLI = join(import.meta.dir, "..", "src", "cli.ts");
const TARGET = join(import.meta.dir, "..", "models", "llama-shakespeare-8m");

async function cli(args: string[], stdin?: string) {
  const proc = Bun.spawn([process.execPath, CLI, ...args], { stdout: "pipe", stderr: "pipe", stdin: stdin === undefined ? "ignore" : new Blob([stdin]) });
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { stdout, stderr, code };
}

describe("generate", () => {
  test("--json reports text, tokens, finishReason and speculation stats on the default pair", async () => {
    const r = await cli(["generate", "--prompt", "ROMEO:", "--max-tokens", "24", "--temperature", "0", "--json"]);
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.tokens.length).toBe(24);
    expect(out.finishReason).toBe("length");
    for (const key of ["promptTokens", "generatedTokens", "prefillMs", "decodeMs", "tokensPerSecond", "forwardPasses", "meanAcceptedLength", "draftTokens", "acceptedTokens", "acceptanceByDepth"]) {
      expect(out.stats).toHaveProperty(key);
    }
    expect(out.stats.draftTokens).toBeGreaterThan(0);
    const plain = JSON.parse((await cli(["generate", "--prompt", "ROMEO:", "--max-tokens", "24", "--temperature", "0", "--json", "--no-spec"])).stdout);
    expect(plain.tokens).toEqual(out.tokens);
    expect(plain.stats.draftTokens).toBe(0);
  });

  test("streams the prompt and its continuation as text", async () => {
    const r = await cli(["generate", "--prompt", "JULIET:", "--max-tokens", "16", "--ngram", "--tree", "dynamic:16"]);
    expect(r.code).toBe(0);
    expect(r.stdout.startsWith("JULIET:")).toBe(true);
    expect(r.stdout.length).toBeGreaterThan(20);
  });

  test("a reader that closes early (| head) ends the run with exit code 0", async () => {
    const proc = Bun.spawn([process.execPath, CLI, "generate", "--prompt", "ROMEO:", "--max-tokens", "200"], { stdout: "pipe", stderr: "pipe" });
    const reader = proc.stdout.getReader();
    await reader.read();
    await reader.cancel();
    expect(await proc.exited).toBe(0);
    expect(await new Response(proc.stderr).text()).toBe("");
  });

  test("--ssm with --model drafts with the given model", async () => {
    const r = await cli(["generate", "--model", join(TARGET, "model.gguf"), "--ssm", join(TARGET, "..", "llama-shakespeare-1.4m-draft"), "--prompt", "KING:", "--max-tokens", "12", "--json"]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).stats.draftTokens).toBeGreaterThan(0);
  });
});

describe("bad input: one line on stderr, exit code 2, no stack trace", () => {
  const dir = mkdtempSync(join(tmpdir(), "specinfer-cli-"));
  const broken = join(dir, "broken");
  Bun.spawnSync(["mkdir", "-p", broken]);
  writeFileSync(join(broken, "config.json"), "{}");
  writeFileSync(join(broken, "model.safetensors"), new Uint8Array([1, 2, 3]));
  for (const [name, args, pattern] of [
    ["unknown flag", ["generate", "--prompt", "x", "--bogus"], /bogus/],
    ["missing prompt", ["generate"], /--prompt/],
    ["missing model", ["generate", "--prompt", "x", "--model", join(dir, "nope")], /no such file/],
    ["bad number", ["generate", "--prompt", "x", "--temperature", "hot"], /--temperature/],
    ["bad tree", ["generate", "--prompt", "x", "--tree", "1,x"], /--tree/],
    ["broken model files", ["info", broken], /broken/],
    ["unknown command", ["frobnicate"], /unknown command/],
    ["bad token ids", ["logits", "--model", TARGET, "--tokens", "1,,2"], /--tokens/],
    ["token id outside the vocabulary", ["logits", "--model", TARGET, "--tokens", "1,99999"], /outside the vocabulary/],
  ] as const) {
    test(name, async () => {
      const r = await cli([...args]);
      expect(r.code).toBe(2);
      expect(r.stderr.trim().split("\n").length).toBe(1);
      expect(r.stderr).toMatch(pattern);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    });
  }
});

describe("other commands", () => {
  test("every command has --help", async () => {
    for (const c of ["generate", "chat", "info", "logits"]) {
      const r = await cli([c, "--help"]);
      expect(r.code).toBe(0);
      expect(r.stdout).toContain(`specinfer ${c}`);
    }
  });

  test("info describes the model", async () => {
    const r = await cli(["info", TARGET, "--json"]);
    expect(r.code).toBe(0);
    const info = JSON.parse(r.stdout);
    expect(info.parameters).toBe(8335008);
    expect(info.contextLength).toBe(256);
    expect(info.tokenizer.vocabSize).toBe(4096);
  });

  test("logits --json prints top logits and a greedy continuation from raw ids, equal across formats", async () => {
    const args = ["--tokens", "1,2869,4058,13", "--top", "5", "--greedy", "6", "--json"];
    const a = JSON.parse((await cli(["logits", "--model", TARGET, ...args])).stdout);
    const b = JSON.parse((await cli(["logits", "--model", join(TARGET, "model.gguf"), ...args])).stdout);
    expect(a.top.length).toBe(5);
    expect(a.top[0].logit).toBeGreaterThanOrEqual(a.top[1].logit);
    expect(a.greedy.length).toBe(6);
    expect(b.greedy).toEqual(a.greedy);
    expect(b.top.map((t: { id: number }) => t.id)).toEqual(a.top.map((t: { id: number }) => t.id));
  });

  test("chat answers each line read from stdin", async () => {
    const r = await cli(["chat", "--max-tokens", "8"], "Who art thou?\nSpeak again.\n");
    expect(r.code).toBe(0);
    expect(r.stdout.trim().split("\n").length).toBeGreaterThanOrEqual(2);
  });
});

// The scripting API on the embedded default pair, the README example included.

import { afterAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { DEFAULT_DRAFT, DEFAULT_MODEL, LLM, SSM } from "../src/index";

const llm = await LLM.load();
afterAll(() => llm.close());

describe("LLM on the embedded pair", () => {
  test("speculates by default and gives the same greedy text as plain decoding", async () => {
    expect(llm.speculating).toBe(true);
    const spec = await llm.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0 });
    const plain = await LLM.load(DEFAULT_MODEL);
    const ref = await plain.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0 });
    plain.close();
    expect(plain.speculating).toBe(false);
    expect(spec.tokens).toEqual(ref.tokens);
    expect(spec.text).toBe(ref.text);
    expect(spec.text.length).toBeGreaterThan(20);
    expect(spec.finishReason).toBe("length");
    expect(spec.stats.generatedTokens).toBe(40);
    expect(spec.stats.meanAcceptedLength).toBeGreaterThan(1);
    expect(spec.fromDraft.some((d) => d)).toBe(true);
    expect(spec.stats.acceptanceByDepth.length).toBeGreaterThan(0);
    expect(ref.stats.forwardPasses).toBeGreaterThan(spec.stats.forwardPasses);
  });

  test("stream pieces concatenate to the generated text; same seed, same sample", async () => {
    const opts = { maxNewTokens: 30, temperature: 0.8, topP: 0.9, seed: 3 };
    let streamed = "";
    const tokens: number[] = [];
    for await (const piece of llm.stream("JULIET:\n", opts)) {
      streamed += piece.text;
      tokens.push(...piece.tokens);
    }
    const again = await llm.generate("JULIET:\n", opts);
    expect(streamed).toBe(again.text);
    expect(tokens).toEqual(again.tokens);
    expect(llm.tokenizer.decode(again.tokens)).toBe(again.text);
  });

  test("stop strings end the text before the match, and the tokens with it", async () => {
    const full = await llm.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0 });
    const stop = full.text.slice(12, 16);
    const cut = await llm.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0, stop: [stop] });
    expect(cut.finishReason).toBe("stop");
    expect(cut.text).toBe(full.text.slice(0, full.text.indexOf(stop)));
    expect(full.tokens.slice(0, cut.tokens.length)).toEqual(cut.tokens);
  });

  test("concurrent requests share the engine and each gets its own answer", async () => {
    const prompts = ["KING RICHARD III:\n", "First Citizen:\n", "PROSPERO:\n"];
    const together = await Promise.all(prompts.map((p) => llm.generate(p, { maxNewTokens: 20 })));
    for (let i = 0; i < prompts.length; i++) {
      expect(together[i].tokens).toEqual((await llm.generate(prompts[i], { maxNewTokens: 20 })).tokens);
    }
  });

  test("chat renders the plain fallback template and replies", async () => {
    const reply = await llm.chat([{ role: "user", content: "Who art thou?" }], { maxNewTokens: 10 });
    expect(reply.tokens.length).toBe(10);
    expect(llm.chatPrompt([{ role: "user", content: "hi" }])).toEqual(llm.tokenizer.encode("user: hi\nassistant:"));
  });

  test("compile switches drafters and tree shapes; output stays the LLM's", async () => {
    const base = await llm.generate("PROSPERO:\n", { maxNewTokens: 24, temperature: 0 });
    const ssm = await SSM.load(join(DEFAULT_DRAFT, "model.gguf"), { llm });
    for (const setup of [{ ssms: [ssm], tree: "dynamic:24" }, { ssms: [ssm], tree: [2, 2, 1], ngram: true }, { ngram: true }, null]) {
      llm.compile(setup);
      expect((await llm.generate("PROSPERO:\n", { maxNewTokens: 24, temperature: 0 })).tokens).toEqual(base.tokens);
    }
  });

  test("the model's generation_config.json sets the sampling defaults; a call's options win", async () => {
    expect(llm.defaults).toEqual({ temperature: 0.8, topK: 40 });
    const a = await llm.generate("ROMEO:\n", { maxNewTokens: 16, seed: 4 });
    const b = await llm.generate("ROMEO:\n", { maxNewTokens: 16, seed: 4, temperature: 0.8, topK: 40 });
    expect(a.tokens).toEqual(b.tokens);
  });

  test("aggregate stats add up the finished requests", async () => {
    const before = llm.stats();
    const a = await llm.generate("ROMEO:\n", { maxNewTokens: 12 });
    const b = await llm.generate("JULIET:\n", { maxNewTokens: 9 });
    const after = llm.stats();
    expect(after.generatedTokens - before.generatedTokens).toBe(21);
    expect(after.decodeSteps - before.decodeSteps).toBe(a.stats.decodeSteps + b.stats.decodeSteps);
    expect(after.draftTokens - before.draftTokens).toBe(a.stats.draftTokens + b.stats.draftTokens);
  });

  test("bad options are refused with the field named, and the LLM keeps working", async () => {
    await expect(llm.generate("x", { temperature: -2 })).rejects.toThrow(/temperature/);
    await expect(llm.generate("x", { topP: 0 })).rejects.toThrow(/topP/);
    expect((await llm.generate("x", { maxNewTokens: 3 })).tokens.length).toBe(3);
  });
});

test("the README example runs", async () => {
  const proc = Bun.spawn([process.execPath, join(import.meta.dir, "..", "examples", "quickstart.ts")], { stdout: "pipe", stderr: "pipe" });
  const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  expect(code).toBe(0);
  expect(out).toMatch(/tokens per LLM pass/);
  expect(out.split("\n").length).toBeGreaterThan(5);
});

// The scripting API on the embedded default pair (engine in its Worker), the README
// example and every file of examples/ included.

import { afterAll, describe, expect, test } from "bun:test";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { DEFAULT_DRAFT, DEFAULT_MODEL, EngineClosedError, LLM, SSM } from "../../src/index";

const llm = await LLM.load();
afterAll(() => llm.close());

describe("LLM on the embedded pair", () => {
  test("speculates by default and gives the same greedy text as plain decoding", async () => {
    expect(llm.info.speculating).toBe(true);
    const fixed = await llm.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0, speculation: { tree: "1,1,1" } });
    const auto = await llm.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0 });
    const plain = await LLM.load(DEFAULT_MODEL);
    const ref = await plain.generate("ROMEO:\n", { maxNewTokens: 40, temperature: 0 });
    expect(plain.info.speculating).toBe(false);
    await plain.close();
    for (const spec of [fixed, auto]) {
      expect(spec.tokens).toEqual(ref.tokens);
      expect(spec.text).toBe(ref.text);
    }
    expect(fixed.text.length).toBeGreaterThan(20);
    expect(fixed.finishReason).toBe("length");
    expect(fixed.stats.generatedTokens).toBe(40);
    expect(fixed.stats.meanAcceptedLength).toBeGreaterThan(1);
    expect(fixed.fromDraft.some((d) => d)).toBe(true);
    expect(fixed.stats.acceptanceByDepth.length).toBeGreaterThan(0);
    expect(ref.stats.forwardPasses).toBeGreaterThan(fixed.stats.forwardPasses);
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

  test("a list of prompts gives results in order, each as it is alone", async () => {
    const prompts = ["KING RICHARD III:\n", "First Citizen:\n", "PROSPERO:\n"];
    const together = await llm.generate(prompts, { maxNewTokens: 20, seed: 5 });
    expect(together.length).toBe(3);
    for (let i = 0; i < prompts.length; i++) {
      expect(together[i].tokens).toEqual((await llm.generate(prompts[i], { maxNewTokens: 20, seed: 5 })).tokens);
    }
  });

  test("requests with different speculation settings share the engine; greedy output is the LLM's", async () => {
    const settings = [false, "auto", { tree: "2,1,1" }, { tree: "dynamic:8", ngram: true }, { ngram: true }] as const;
    const results = await Promise.all(settings.map((speculation) => llm.generate("MENENIUS:\n", { maxNewTokens: 30, temperature: 0, speculation })));
    for (const r of results) expect(r.tokens).toEqual(results[0].tokens);
    expect(results[0].stats.draftTokens).toBe(0);
    expect(results[2].stats.draftTokens).toBeGreaterThan(0);
    const refused = await llm.generate("x", { speculation: { tree: "9,9,9" } }).catch((e: Error) => e);
    expect((refused as Error).message).toMatch(/^speculation\.tree: .*819 nodes/);
  });

  test("logprobs are the target model's log-softmax of each emitted token, with alternatives", async () => {
    const r = await llm.generate("ROMEO:\n", { maxNewTokens: 12, temperature: 0, logprobs: 3 });
    expect(r.logprobs!.length).toBe(12);
    r.logprobs!.forEach((lp, i) => {
      expect(lp.token).toBe(r.tokens[i]);
      expect(lp.top.length).toBe(3);
      // Greedy: the emitted token is the most likely one.
      expect(lp.top[0].token).toBe(lp.token);
      expect(lp.top[0].logprob).toBeCloseTo(lp.logprob, 6);
      expect(lp.top[1].logprob).toBeLessThanOrEqual(lp.top[0].logprob);
    });
  });

  test("an AbortSignal cancels the request and frees its blocks at once", async () => {
    const controller = new AbortController();
    let pieces = 0;
    const stream = llm.stream("ROMEO:\n", { maxNewTokens: 400, ignoreEos: true, signal: controller.signal });
    let result;
    for (;;) {
      const next = await stream.next();
      if (next.done) {
        result = next.value;
        break;
      }
      if (++pieces === 3) controller.abort();
    }
    expect(result.finishReason).toBe("cancelled");
    expect(result.tokens.length).toBeLessThan(400);
    const stats = await llm.stats();
    expect(stats.kvBlocksUsed).toBe(0);
    expect(stats.running + stats.waiting).toBe(0);
  });

  test("chat renders the plain fallback template and replies", async () => {
    const reply = await llm.chat([{ role: "user", content: "Who art thou?" }], { maxNewTokens: 10 });
    expect(reply.tokens.length).toBe(10);
    expect(llm.chatPrompt([{ role: "user", content: "hi" }])).toEqual(llm.tokenizer.encode("user: hi\nassistant:"));
  });

  test("compile switches drafters and tree shapes; output stays the LLM's", async () => {
    const base = await llm.generate("PROSPERO:\n", { maxNewTokens: 24, temperature: 0 });
    const ssm = new SSM(join(DEFAULT_DRAFT, "model.gguf"));
    for (const setup of [{ ssms: [ssm], tree: "dynamic:24" }, { ssms: [ssm], tree: [2, 2, 1], ngram: true }, { ngram: true }, {}]) {
      const info = await llm.compile(setup);
      expect(info.speculating).toBe(setup.ssms !== undefined || setup.ngram === true);
      expect((await llm.generate("PROSPERO:\n", { maxNewTokens: 24, temperature: 0 })).tokens).toEqual(base.tokens);
    }
    await llm.compile({ ssms: [DEFAULT_DRAFT] });
  });

  test("compile takes SpecInfer's batch limits; they bound the engine and leave greedy output unchanged", async () => {
    const prompt = "KING RICHARD III:\nNow is the winter of our discontent made glorious summer by this sun of York;\n".repeat(2);
    const prompts = ["ROMEO:\n", "JULIET:\n", prompt, "HAMLET:\n", "MACBETH:\n"];
    const greedy = { maxNewTokens: 24, temperature: 0 };
    const before = await llm.generate(prompts, greedy);
    const plainBefore = await llm.generate(prompt, { maxNewTokens: 4, temperature: 0, speculation: false });
    const context = llm.info.contextLength;

    const info = await llm.compile({ ssms: [DEFAULT_DRAFT], maxRequestsPerBatch: 2, maxTokensPerBatch: 32, maxSeqLength: 96 });
    expect([info.maxRequestsPerBatch, info.maxTokensPerBatch, info.contextLength]).toEqual([2, 32, 96]);
    let mostRunning = 0;
    const poll = setInterval(async () => (mostRunning = Math.max(mostRunning, (await llm.stats()).running)), 2);
    const after = await llm.generate(prompts, greedy);
    clearInterval(poll);
    expect(mostRunning).toBeLessThanOrEqual(2);
    expect(after.map((r) => r.tokens)).toEqual(before.map((r) => r.tokens));
    // A 32-token batch prefills the long prompt in chunks: more forward passes.
    const promptTokens = llm.tokenizer.encode(prompt).length;
    const plainAfter = await llm.generate(prompt, { maxNewTokens: 4, temperature: 0, speculation: false });
    expect(plainAfter.tokens).toEqual(plainBefore.tokens);
    expect(plainAfter.stats.forwardPasses).toBeGreaterThanOrEqual(Math.ceil(promptTokens / 32) + 3);
    expect(plainBefore.stats.forwardPasses).toBeLessThan(plainAfter.stats.forwardPasses);
    // maxSeqLength 96 ends a long generation at 96 tokens in all.
    const capped = await llm.generate("ROMEO:\n", { maxNewTokens: 500, temperature: 0, ignoreEos: true });
    expect(capped.finishReason).toBe("length");
    expect(capped.promptTokens + capped.tokens.length).toBeLessThanOrEqual(96);

    for (const [bad, field] of [[{ maxTokensPerBatch: 0 }, "maxTokensPerBatch"], [{ maxRequestsPerBatch: 1.5 }, "maxRequestsPerBatch"], [{ maxSeqLength: -3 }, "maxSeqLength"]] as const) {
      const refused = await llm.compile({ ssms: [DEFAULT_DRAFT], ...bad }).then(() => null, (e: Error) => e);
      expect(refused?.message).toContain(field);
    }
    expect((await llm.generate("ROMEO:\n", greedy)).tokens).toEqual(before[0].tokens); // still serving, limits kept
    expect(llm.info.maxTokensPerBatch).toBe(32);

    const restored = await llm.compile({ ssms: [DEFAULT_DRAFT], maxRequestsPerBatch: 8, maxTokensPerBatch: 512, maxSeqLength: context });
    expect([restored.maxRequestsPerBatch, restored.maxTokensPerBatch, restored.contextLength]).toEqual([8, 512, context]);
    expect((await llm.generate(prompts, greedy)).map((r) => r.tokens)).toEqual(before.map((r) => r.tokens));
  });

  test("the model's generation_config.json sets the sampling defaults; a call's options win", async () => {
    expect(llm.defaults).toEqual({ temperature: 0.8, topK: 40 });
    const a = await llm.generate("ROMEO:\n", { maxNewTokens: 16, seed: 4 });
    const b = await llm.generate("ROMEO:\n", { maxNewTokens: 16, seed: 4, temperature: 0.8, topK: 40 });
    expect(a.tokens).toEqual(b.tokens);
  });

  test("engine counters add up the finished requests", async () => {
    const before = await llm.stats();
    const a = await llm.generate("ROMEO:\n", { maxNewTokens: 12, speculation: { tree: "1,1" } });
    const b = await llm.generate("JULIET:\n", { maxNewTokens: 9, speculation: { tree: "1,1" } });
    const after = await llm.stats();
    expect(after.generatedTokens - before.generatedTokens).toBe(21);
    expect(after.numDraftTokens - before.numDraftTokens).toBe(a.stats.draftTokens + b.stats.draftTokens);
    expect(after.numAcceptedTokens - before.numAcceptedTokens).toBe(a.stats.acceptedTokens + b.stats.acceptedTokens);
    expect(after.kvBlocksUsed).toBe(0);
  });

  test("bad options and prompts are refused with the field named, and the LLM keeps working", async () => {
    await expect(llm.generate("x", { temperature: -2 })).rejects.toThrow(/temperature/);
    await expect(llm.generate("x", { topP: 0 })).rejects.toThrow(/topP/);
    await expect(llm.generate([], {})).rejects.toThrow(/prompt is empty/);
    await expect(llm.generate([1, 1e9], {})).rejects.toThrow(/outside the vocabulary/);
    expect((await llm.generate("x", { maxNewTokens: 3 })).tokens.length).toBe(3);
  });
});

describe("failures never hang a caller", () => {
  test("a step that throws fails only the requests in it; the engine serves the others", async () => {
    const one = await LLM.load(undefined, { maxRequestsPerBatch: 1 });
    const first = one.generate("ROMEO:\n", { maxNewTokens: 30, temperature: 0 }).catch((e: Error) => e);
    const second = one.generate("JULIET:\n", { maxNewTokens: 30, temperature: 0 });
    one.injectFault("injected fault in a step");
    expect(((await first) as Error).message).toBe("injected fault in a step");
    const ok = await second;
    expect(ok.tokens.length).toBe(30);
    expect((await one.stats()).kvBlocksUsed).toBe(0);
    await one.close();
  });

  test("close() rejects what is in flight with a clear error, and later calls too", async () => {
    const doomed = await LLM.load();
    const pending = doomed.generate("ROMEO:\n", { maxNewTokens: 500, ignoreEos: true }).catch((e) => e);
    await Bun.sleep(20);
    await doomed.close();
    expect(await pending).toBeInstanceOf(EngineClosedError);
    await expect(doomed.generate("x")).rejects.toThrow(/closed/);
  });
});

test("the README example and every file in examples/ run", async () => {
  const dir = join(import.meta.dir, "..", "..", "examples");
  for (const file of readdirSync(dir).filter((f) => f.endsWith(".ts"))) {
    const proc = Bun.spawn([process.execPath, join(dir, file)], { stdout: "pipe", stderr: "pipe" });
    const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    expect({ file, code, err: code === 0 ? "" : err }).toEqual({ file, code: 0, err: "" });
    expect(out.split("\n").length).toBeGreaterThan(5);
  }
});

// Engine faults seen through HTTP, on a real server (Bun.serve on 127.0.0.1, engine in
// its Worker): a step that throws (the engine's test hook) fails only the requests in
// that step, with its message, and the others finish with the text they have alone; a
// KV pool too small for the load preempts and recomputes instead of failing anything.

import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { LLM } from "../../src/index";
import { createApp } from "../../src/server/app";
import { listen } from "../../src/server/listen";
import { eventually, expectPoolFull, metric, SERVED, type Json } from "./helpers";

interface Served {
  llm: LLM;
  base: string;
  stop(): Promise<void>;
}

async function serve(options: Parameters<typeof LLM.load>[1]): Promise<Served> {
  const llm = await LLM.load(undefined, options);
  const server = listen(createApp(llm, { servedModelName: SERVED }), { hostname: "127.0.0.1", port: 0 });
  return { llm, base: `http://127.0.0.1:${server.port}`, stop: async () => void (server.stop(true), await llm.close()) };
}

// One request runs at a time: a step holds exactly the running request, the rest wait.
const single = await serve({ maxRequestsPerBatch: 1 });
// About 190 tokens of KV for 8 requests of ~110 tokens each.
const BLOCK_BYTES = Math.ceil((1 << 20) / 28);
const small = await serve({ maxRequestsPerBatch: 8, kvMemory: 12 * BLOCK_BYTES });
afterEach(async () => {
  await expectPoolFull(single.llm);
  await expectPoolFull(small.llm);
});
afterAll(async () => {
  await single.stop();
  await small.stop();
});

const post = (s: Served, path: string, body: Json, signal?: AbortSignal) =>
  fetch(s.base + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal });

const greedy = (prompt: string, maxTokens: number) => ({ prompt, max_tokens: maxTokens, temperature: 0, ignore_eos: true });

async function tokensOf(res: Response): Promise<number[]> {
  expect(res.status).toBe(200);
  return ((await res.json()) as Json).choices[0].token_ids;
}

/** Every event of an SSE body. */
async function allEvents(res: Response): Promise<Json[]> {
  const text = await res.text();
  return text
    .split("\n\n")
    .filter((b) => b)
    .map((b) => (b === "data: [DONE]" ? "[DONE]" : JSON.parse(b.slice("data: ".length))));
}

describe("a step that throws", () => {
  test("fails the streamed request in that step with an SSE error event carrying the message; the waiting requests finish with their own text", async () => {
    const alone = await Promise.all(["JULIET:", "KING:"].map(async (p) => tokensOf(await post(single, "/v1/completions", greedy(p, 8)))));
    const victim = await post(single, "/v1/completions", { ...greedy("ROMEO:", 200), stream: true });
    expect(victim.status).toBe(200);
    const waiting = ["JULIET:", "KING:"].map((p) => post(single, "/v1/completions", greedy(p, 8)));
    // Once the victim has produced tokens it is the step; the others wait behind it.
    const reader = victim.body!.pipeThrough(new TextDecoderStream()).getReader();
    let text = (await reader.read()).value ?? "";
    expect(await eventually(async () => (await single.llm.stats()).waiting === 2)).toBe(true);
    single.llm.injectFault("injected fault: the forward pass blew up");
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += value;
    }
    const events = text.split("\n\n").filter((b) => b).map((b) => b.slice("data: ".length));
    expect(events).not.toContain("[DONE]");
    const last = JSON.parse(events.at(-1)!);
    expect(last.error.message).toBe("injected fault: the forward pass blew up");
    expect(last.error.type).toBe("server_error");
    expect(events.slice(0, -1).every((e) => JSON.parse(e).choices[0].finish_reason === null)).toBe(true);
    expect(await Promise.all(waiting.map(async (r) => tokensOf(await r)))).toEqual(alone);
  });

  test("fails a plain request in that step with a 500 carrying the message; the waiting ones get 200 with their own text", async () => {
    const alone = await tokensOf(await post(single, "/v1/chat/completions", { messages: [{ role: "user", content: "Speak." }], max_tokens: 6, temperature: 0, ignore_eos: true }));
    const victim = post(single, "/v1/completions", greedy("ROMEO:", 200));
    expect(await eventually(async () => (await single.llm.stats()).generatedTokens > 0 && (await single.llm.stats()).running === 1)).toBe(true);
    const waiting = [1, 2, 3].map(() => post(single, "/v1/chat/completions", { messages: [{ role: "user", content: "Speak." }], max_tokens: 6, temperature: 0, ignore_eos: true }));
    expect(await eventually(async () => (await single.llm.stats()).waiting === 3)).toBe(true);
    single.llm.injectFault("injected fault: out of device memory");
    const failed = await victim;
    expect(failed.status).toBe(500);
    const body = (await failed.json()) as Json;
    expect(body.error).toEqual({ message: "injected fault: out of device memory", type: "server_error", param: null, code: null });
    for (const r of waiting) expect(await tokensOf(await r)).toEqual(alone);
  });

  test("after a fault the server goes on serving: /health 200, a fresh request 200", async () => {
    single.llm.injectFault("injected fault: one-off");
    const first = await post(single, "/v1/completions", greedy("ROMEO:", 4));
    expect(first.status).toBe(500);
    expect((await fetch(`${single.base}/health`)).status).toBe(200);
    expect(await tokensOf(await post(single, "/v1/completions", greedy("ROMEO:", 4)))).toHaveLength(4);
  });
});

describe("a KV pool exhausted by load", () => {
  test("preempts (specinfer_num_preemptions_total > 0) and every request gets a 200 with the text it has alone", async () => {
    const prompts = ["ROMEO:", "JULIET:", "KING:", "First Citizen:", "MENENIUS:", "CORIOLANUS:", "DUKE:", "HAMLET:"];
    const total = (await small.llm.stats()).kvBlocksTotal;
    expect(total).toBe(12);
    const alone: number[][] = [];
    for (const p of prompts) alone.push(await tokensOf(await post(small, "/v1/completions", greedy(p, 100))));
    const before = metric(await (await fetch(`${small.base}/metrics`)).text(), "specinfer_num_preemptions_total");
    // Half streamed, half not: both paths see the preemption.
    const together = await Promise.all(
      prompts.map(async (p, i) => {
        if (i % 2 === 0) return tokensOf(await post(small, "/v1/completions", greedy(p, 100)));
        const events = await allEvents(await post(small, "/v1/completions", { ...greedy(p, 100), stream: true }));
        expect(events.at(-1)).toBe("[DONE]");
        return events.slice(0, -1).flatMap((e: Json) => e.choices[0].token_ids ?? []);
      }),
    );
    expect(together).toEqual(alone);
    const metrics = await (await fetch(`${small.base}/metrics`)).text();
    expect(metric(metrics, "specinfer_num_preemptions_total")).toBeGreaterThan(before);
    expect(metric(metrics, "specinfer_kv_cache_blocks_total")).toBe(12);
  });
});

// A real server (Bun.serve on 127.0.0.1, engine in its Worker) driven by the official
// `openai` npm client: completions and chat, streamed or not, errors as the SDK's
// error classes, concurrency, disconnects and /health under load.

import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { Hono } from "hono";
import OpenAI, { APIError, APIUserAbortError, AuthenticationError, BadRequestError, NotFoundError, RateLimitError } from "openai";
import { LLM } from "../../src/index";
import { createApp } from "../../src/server/app";
import { listen } from "../../src/server/listen";
import { eventually, expectPoolFull, metric, SERVED, targetLogSoftmax, type Json } from "./helpers";

const KEY = "test-key";
const llm = await LLM.load();
const server = listen(createApp(llm, { servedModelName: SERVED, apiKey: KEY }), { hostname: "127.0.0.1", port: 0 });
const base = `http://127.0.0.1:${server.port}`;
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: KEY, maxRetries: 0 });
afterEach(() => expectPoolFull(llm));
afterAll(async () => {
  server.stop(true);
  await llm.close();
});

const PROMPT = "ROMEO:\n";
const messages = [{ role: "user" as const, content: "Who art thou?" }];

async function expectRejects<T>(call: () => Promise<unknown>, type: new (...a: never[]) => T, status: number): Promise<T> {
  try {
    await call();
  } catch (e) {
    expect(e).toBeInstanceOf(type);
    expect((e as APIError).status).toBe(status);
    return e as T;
  }
  throw new Error(`expected a ${status}`);
}

describe("openai client against a real server", () => {
  test("chat and completions, streamed and not, give the model's greedy text", async () => {
    const want = (await llm.generate(llm.chatPrompt(messages), { temperature: 0, maxNewTokens: 20 })).text;
    const chat = await client.chat.completions.create({ model: SERVED, messages, temperature: 0, max_tokens: 20 });
    expect(chat.choices[0].message.content).toBe(want);
    let streamed = "";
    for await (const chunk of await client.chat.completions.create({ model: SERVED, messages, temperature: 0, max_tokens: 20, stream: true })) {
      streamed += chunk.choices[0]?.delta.content ?? "";
    }
    expect(streamed).toBe(want);

    const wantText = (await llm.generate(PROMPT, { temperature: 0, maxNewTokens: 20 })).text;
    const completion = await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0, max_tokens: 20 });
    expect(completion.choices[0].text).toBe(wantText);
    expect(completion.usage?.completion_tokens).toBe(20);
    let text = "";
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0, max_tokens: 20, stream: true, stream_options: { include_usage: true } })) {
      text += chunk.choices[0]?.text ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(wantText);
    expect(usage).toEqual(completion.usage);
  });

  test("n=2: two seeded generations, each equal to its own request", async () => {
    // Plain decoding: a speculative draw also depends on the trees "auto" drafts.
    const plain = { speculation: false } as object;
    const two = await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0.9, max_tokens: 16, seed: 3, n: 2, ...plain });
    expect(two.choices).toHaveLength(2);
    for (const i of [0, 1]) {
      const one = await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0.9, max_tokens: 16, seed: 3 + i, ...plain });
      expect(two.choices[i].text).toBe(one.choices[0].text);
    }
  });

  test("a stop string inside a speculative step is cut from a streamed reply", async () => {
    const spec = { speculation: { tree: "1,1,3" } } as object;
    const full = await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0, max_tokens: 48, logprobs: 0, ...spec });
    const { tokens, text_offset: offsets } = full.choices[0].logprobs!;
    const fromDraft: boolean[] = (full.choices[0] as unknown as { from_draft: boolean[] }).from_draft;
    const text = full.choices[0].text;
    const k = fromDraft.findIndex((d, i) => d && i > 0 && i + 1 < tokens!.length && text.indexOf(tokens![i] + tokens![i + 1]) === offsets![i]);
    expect(k).toBeGreaterThan(0);
    const stop = tokens![k] + tokens![k + 1];
    let streamed = "";
    let reason: string | null = null;
    for await (const chunk of await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0, max_tokens: 48, stop, stream: true, ...spec })) {
      streamed += chunk.choices[0].text;
      reason = chunk.choices[0].finish_reason ?? reason;
    }
    expect(streamed).toBe(text.slice(0, offsets![k]));
    expect(reason).toBe("stop");
  });

  test("logprobs equal the target's log-softmax from specinfer logits within 1e-4", async () => {
    const chat = await client.chat.completions.create({ model: SERVED, messages, temperature: 0, max_tokens: 3, logprobs: true, top_logprobs: 2 });
    const prompt = llm.chatPrompt(messages);
    const ids = (chat.choices[0] as unknown as { token_ids: number[] }).token_ids;
    const content = chat.choices[0].logprobs!.content!;
    expect(content).toHaveLength(ids.length);
    for (let k = 0; k < ids.length; k++) {
      const ref = await targetLogSoftmax([...prompt, ...ids.slice(0, k)]);
      expect(Math.abs(content[k].logprob - ref[ids[k]])).toBeLessThan(1e-4);
    }
  });

  test("16 concurrent greedy streams each equal the same request alone", async () => {
    const prompts = Array.from({ length: 16 }, (_, i) => `${["ROMEO", "JULIET", "KING HENRY", "First Citizen"][i % 4]}:\n${"Good ".repeat(i % 5)}`);
    const alone = [];
    for (const p of prompts) alone.push((await client.completions.create({ model: SERVED, prompt: p, temperature: 0, max_tokens: 32 })).choices[0].text);
    const together = await Promise.all(
      prompts.map(async (p) => {
        let text = "";
        for await (const chunk of await client.completions.create({ model: SERVED, prompt: p, temperature: 0, max_tokens: 32, stream: true })) text += chunk.choices[0].text;
        return text;
      }),
    );
    expect(together).toEqual(alone);
  });

  test("/health answers promptly while 16 streams run", async () => {
    let running = true;
    const streams = Promise.all(
      Array.from({ length: 16 }, async (_, i) => {
        const stream = await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0.8, seed: i, max_tokens: 120, ignore_eos: true, stream: true } as OpenAI.CompletionCreateParamsStreaming);
        for await (const _chunk of stream);
      }),
    ).finally(() => (running = false));
    const latencies: number[] = [];
    while (running) {
      const t0 = performance.now();
      const res = await fetch(`${base}/health`);
      expect(res.status).toBe(200);
      latencies.push(performance.now() - t0);
      await Bun.sleep(5);
    }
    await streams;
    latencies.sort((a, b) => a - b);
    const p99 = latencies[Math.floor(0.99 * (latencies.length - 1))];
    console.log(`/health under 16 streams: ${latencies.length} probes, p50 ${latencies[latencies.length >> 1].toFixed(1)} ms, p99 ${p99.toFixed(1)} ms`);
    expect(latencies.length).toBeGreaterThan(5);
    expect(p99).toBeLessThan(500);
  });

  test("a client that disconnects mid-stream frees its KV blocks (visible in /metrics)", async () => {
    const stream = await client.completions.create({ model: SERVED, prompt: PROMPT, temperature: 0, max_tokens: 200, ignore_eos: true, stream: true } as OpenAI.CompletionCreateParamsStreaming);
    for await (const _chunk of stream) break; // leaving the loop aborts the HTTP request
    const scrape = async () => (await fetch(`${base}/metrics`, { headers: { Authorization: `Bearer ${KEY}` } })).text();
    expect(await eventually(async () => {
      const text = await scrape();
      return metric(text, "specinfer_kv_cache_blocks_used") === 0 && metric(text, "specinfer_num_requests_running") === 0;
    })).toBe(true);
  });
  test("a client that gives up on a non-streamed request cancels it too", async () => {
    const before = (await llm.stats()).generatedTokens;
    const gone = new AbortController();
    const body = { model: SERVED, prompt: PROMPT, max_tokens: 250, ignore_eos: true, n: 8, speculation: false };
    const request = client.completions.create(body as OpenAI.CompletionCreateParamsNonStreaming, { signal: gone.signal }).then(
      () => "answered",
      (e: unknown) => e,
    );
    expect(await eventually(async () => (await llm.stats()).running === 8)).toBe(true);
    gone.abort();
    expect(await request).toBeInstanceOf(APIUserAbortError);
    await expectPoolFull(llm);
    expect((await llm.stats()).generatedTokens - before).toBeLessThan(8 * 250);
  });
});

describe("errors surface as the SDK's error classes", () => {
  test("bad parameters are BadRequestError naming the parameter", async () => {
    const e = await expectRejects(() => client.chat.completions.create({ model: SERVED, messages, temperature: 5 }), BadRequestError, 400);
    expect(e.param).toBe("temperature");
    const empty = await expectRejects(() => client.chat.completions.create({ model: SERVED, messages: [] }), BadRequestError, 400);
    expect(empty.param).toBe("messages");
    const long = await expectRejects(() => client.completions.create({ model: SERVED, prompt: [1, 2, 3], max_tokens: llm.info.contextLength }), BadRequestError, 400);
    expect(long.param).toBe("max_tokens");
    const tools = await expectRejects(
      () => client.chat.completions.create({ model: SERVED, messages, tools: [{ type: "function", function: { name: "f", parameters: {} } }] }),
      BadRequestError,
      400,
    );
    expect(tools.param).toBe("tools");
  });

  test("malformed JSON is a 400", async () => {
    const res = await fetch(`${base}/v1/completions`, { method: "POST", headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" }, body: "{" });
    expect(res.status).toBe(400);
    expect(((await res.json()) as Json).error.message).toMatch(/Malformed JSON/);
  });

  test("unknown model and unknown route are NotFoundError; wrong method a 405 APIError", async () => {
    const e = await expectRejects(() => client.completions.create({ model: "gpt-9", prompt: "x" }), NotFoundError, 404);
    expect(e.code).toBe("model_not_found");
    await expectRejects(() => client.post("/nothing", { body: {} }), NotFoundError, 404);
    await expectRejects(() => client.get("/chat/completions"), APIError, 405);
  });

  test("a missing or wrong key is AuthenticationError; /health needs none", async () => {
    const wrong = new OpenAI({ baseURL: `${base}/v1`, apiKey: "nope", maxRetries: 0 });
    await expectRejects(() => wrong.models.list(), AuthenticationError, 401);
    const res = await fetch(`${base}/v1/models`);
    expect(res.status).toBe(401);
    expect((await fetch(`${base}/health`)).status).toBe(200);
  });

  test("a body over the limit is a 413 APIError", async () => {
    await expectRejects(() => client.completions.create({ model: SERVED, prompt: "x".repeat(5 * 1024 * 1024) }), APIError, 413);
  });

  test("a full queue is RateLimitError with Retry-After", async () => {
    const limited = listen(createApp(llm, { servedModelName: SERVED, maxInFlight: 1 }), { hostname: "127.0.0.1", port: 0 });
    try {
      const c = new OpenAI({ baseURL: `http://127.0.0.1:${limited.port}/v1`, apiKey: "none", maxRetries: 0 });
      const busy = await c.completions.create({ model: SERVED, prompt: PROMPT, max_tokens: 100, ignore_eos: true, stream: true } as OpenAI.CompletionCreateParamsStreaming);
      const e = await expectRejects(() => c.completions.create({ model: SERVED, prompt: PROMPT, max_tokens: 2 }), RateLimitError, 429);
      expect(e.headers?.get("retry-after")).toBe("1");
      for await (const _chunk of busy);
    } finally {
      limited.stop(true);
    }
  });

  test("an engine failure mid-stream is an APIError thrown by the stream", async () => {
    const stream = await client.completions.create({ model: SERVED, prompt: PROMPT, max_tokens: 200, ignore_eos: true, stream: true } as OpenAI.CompletionCreateParamsStreaming);
    let chunks = 0;
    let error: unknown = null;
    try {
      for await (const _chunk of stream) if (++chunks === 1) llm.injectFault("injected step failure");
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(APIError);
    expect((error as APIError).message).toContain("injected step failure");
    expect(chunks).toBeGreaterThan(0);
  });
});

/** Sends one keep-alive request on a raw socket; resolves with ms until the server
 *  closed the connection, or -1 if it was still open after `waitMs`. */
function closedAfter(port: number, request: string, waitMs: number): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    void Bun.connect({
      hostname: "127.0.0.1",
      port,
      socket: {
        open: (socket) => void socket.write(request),
        data: () => {},
        close: () => resolve(performance.now() - t0),
      },
    });
    setTimeout(() => resolve(-1), waitMs);
  });
}

test("a silent stream (a long prefill) outlives the idle timeout under listen(), not under a bare Bun.serve; after a POST the connection idles out again", async () => {
  // Headers at once, the first event 6 s later (Bun checks idle sockets every few seconds).
  const silent = new Hono()
    .post("/quick", (c) => c.json({ ok: true }))
    .post("/silent", () => {
      const body = new ReadableStream({
        start: (out) =>
          void setTimeout(() => {
            try {
              out.enqueue(new TextEncoder().encode("data: late\n\n"));
              out.close();
            } catch {
              // the bare server already dropped the connection
            }
          }, 6000),
      });
      return new Response(body, { headers: { "Content-Type": "text/event-stream" } });
    });
  const ours = listen(silent, { hostname: "127.0.0.1", port: 0, idleTimeout: 1 });
  const bare = Bun.serve({ hostname: "127.0.0.1", port: 0, idleTimeout: 1, fetch: silent.fetch });
  try {
    const read = (port: number) => fetch(`http://127.0.0.1:${port}/silent`, { method: "POST" }).then((r) => r.text());
    const [kept, dropped, idleAfterPost] = await Promise.allSettled([
      read(ours.port!),
      read(bare.port!),
      closedAfter(ours.port!, "POST /quick HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 9000),
    ]);
    expect(kept).toEqual({ status: "fulfilled", value: "data: late\n\n" });
    expect(dropped.status).toBe("rejected");
    expect(idleAfterPost.status === "fulfilled" && idleAfterPost.value > 0).toBe(true);
  } finally {
    ours.stop(true);
    bare.stop(true);
  }
});

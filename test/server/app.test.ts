// The HTTP API in process (app.request) against an in-thread engine on the embedded
// pair: response shapes, n, stop strings, logprobs against `specinfer logits`,
// penalties, speculation fields, streaming, cancellation and metrics.

import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { LLM } from "../../src/index";
import { createApp } from "../../src/server/app";
import { expectPoolFull, metric, post, readSse, SERVED, targetLogSoftmax, type Json } from "./helpers";

const llm = await LLM.load(undefined, { worker: false });
const app = createApp(llm, { servedModelName: SERVED });
afterEach(() => expectPoolFull(llm));
afterAll(() => llm.close());

const PROMPT = "ROMEO:\n";
const greedy = { temperature: 0, max_tokens: 24 };

async function completion(body: Json): Promise<Json> {
  const res = await post(app, "/v1/completions", { model: SERVED, ...body });
  expect(res.status).toBe(200);
  return res.json();
}

async function chat(body: Json): Promise<Json> {
  const res = await post(app, "/v1/chat/completions", { model: SERVED, ...body });
  expect(res.status).toBe(200);
  return res.json();
}

describe("completions", () => {
  test("the text is the model's continuation, with usage, finish reason, token ids and one draft flag per token", async () => {
    const body = await completion({ prompt: PROMPT, ...greedy });
    const ref = await llm.generate(PROMPT, { temperature: 0, maxNewTokens: 24 });
    expect(body.object).toBe("text_completion");
    expect(body.model).toBe(SERVED);
    expect(body.id).toStartWith("cmpl-");
    expect(body.choices).toHaveLength(1);
    expect(body.choices[0].text).toBe(ref.text);
    expect(body.choices[0].index).toBe(0);
    expect(body.choices[0].logprobs).toBeNull();
    expect(body.choices[0].finish_reason).toBe("length");
    expect(body.choices[0].from_draft).toHaveLength(24);
    expect(body.choices[0].token_ids).toEqual(ref.tokens);
    const promptTokens = llm.tokenizer.encode(PROMPT).length;
    expect(body.usage).toEqual({ prompt_tokens: promptTokens, completion_tokens: 24, total_tokens: promptTokens + 24 });
  });

  test("a prompt may be text, texts, token ids or lists of ids; choices follow the prompts' order", async () => {
    const other = "JULIET:\n";
    const ids = [llm.tokenizer.encode(PROMPT), llm.tokenizer.encode(other)];
    const single = (await completion({ prompt: PROMPT, ...greedy })).choices[0].text;
    const second = (await completion({ prompt: other, ...greedy })).choices[0].text;
    expect(single).not.toBe(second);
    expect((await completion({ prompt: ids[0], ...greedy })).choices[0].text).toBe(single);
    for (const prompt of [[PROMPT, other], ids]) {
      const body = await completion({ prompt, ...greedy });
      expect(body.choices.map((c: Json) => [c.index, c.text])).toEqual([[0, single], [1, second]]);
      expect(body.usage.prompt_tokens).toBe(ids[0].length + ids[1].length);
      expect(body.usage.completion_tokens).toBe(48);
    }
  });

  test("the routes also answer without the /v1 prefix", async () => {
    const withPrefix = await completion({ prompt: PROMPT, ...greedy });
    const res = await post(app, "/completions", { prompt: PROMPT, ...greedy });
    expect(res.status).toBe(200);
    expect(((await res.json()) as Json).choices[0].text).toBe(withPrefix.choices[0].text);
    expect((await app.request("/models")).status).toBe(200);
  });

  test("a streamed completion adds up to the whole one, ends with [DONE], and include_usage adds a usage chunk", async () => {
    const whole = await completion({ prompt: PROMPT, ...greedy });
    const res = await post(app, "/v1/completions", { prompt: PROMPT, ...greedy, stream: true, stream_options: { include_usage: true } });
    const { events, done } = await readSse(res);
    expect(done).toBe(true);
    const usageChunk = events.at(-1);
    expect(usageChunk.choices).toEqual([]);
    expect(usageChunk.usage).toEqual(whole.usage);
    const chunks = events.slice(0, -1);
    expect(chunks.every((e) => e.object === "text_completion" && e.usage === null && e.id === chunks[0].id)).toBe(true);
    expect(chunks.map((e) => e.choices[0].text).join("")).toBe(whole.choices[0].text);
    expect(chunks.flatMap((e) => e.choices[0].token_ids ?? [])).toEqual(whole.choices[0].token_ids);
    expect(chunks.flatMap((e) => e.choices[0].from_draft ?? [])).toHaveLength(24);
    const last = chunks.at(-1);
    expect(last.choices[0].finish_reason).toBe("length");
    expect(last.speculation.accepted_tokens).toBeGreaterThanOrEqual(chunks.flatMap((e) => e.choices[0].from_draft ?? []).filter((d) => d).length);
    expect(chunks.slice(0, -1).every((e) => e.choices[0].finish_reason === null)).toBe(true);
  });
});

describe("chat completions", () => {
  const messages = [{ role: "user", content: "Who art thou?" }];

  test("the reply is the model's answer to its chat template, streamed or not", async () => {
    const body = await chat({ messages, ...greedy });
    const ref = await llm.generate(llm.chatPrompt(messages), { temperature: 0, maxNewTokens: 24 });
    expect(body.object).toBe("chat.completion");
    expect(body.id).toStartWith("chatcmpl-");
    expect(body.choices[0].message).toEqual({ role: "assistant", content: ref.text });
    expect(body.usage.prompt_tokens).toBe(llm.chatPrompt(messages).length);
    expect(body.usage.completion_tokens).toBe(ref.tokens.length);

    const { events, done } = await readSse(await post(app, "/v1/chat/completions", { messages, ...greedy, stream: true }));
    expect(done).toBe(true);
    expect(events[0].choices[0].delta).toEqual({ role: "assistant", content: "" });
    expect(events.every((e) => e.object === "chat.completion.chunk" && !("usage" in e))).toBe(true);
    expect(events.map((e) => e.choices[0].delta.content).join("")).toBe(ref.text);
    expect(events.at(-1).choices[0].finish_reason).toBe(body.choices[0].finish_reason);
  });

  test("content given as text parts is the same as the plain string", async () => {
    const parts = [{ role: "user", content: [{ type: "text", text: "Who art " }, { type: "text", text: "thou?" }] }];
    expect((await chat({ messages: parts, ...greedy })).choices[0].message).toEqual((await chat({ messages, ...greedy })).choices[0].message);
  });

  test("max_completion_tokens caps the reply like max_tokens", async () => {
    const body = await chat({ messages, temperature: 0, max_completion_tokens: 5, ignore_eos: true });
    expect(body.usage.completion_tokens).toBe(5);
    expect(body.choices[0].finish_reason).toBe("length");
  });
});

describe("sampling parameters", () => {
  // Without speculation: a speculative sample depends on the trees drafted, which
  // "auto" sizes by load (same distribution, not the same draw).
  test("n choices are separate generations: choice i with seed s is the request alone with seed s + i", async () => {
    const sampled = { prompt: PROMPT, temperature: 0.9, max_tokens: 16, ignore_eos: true, speculation: false };
    const body = await completion({ ...sampled, seed: 5, n: 3 });
    expect(body.choices.map((c: Json) => c.index)).toEqual([0, 1, 2]);
    for (let i = 0; i < 3; i++) {
      const alone = await completion({ ...sampled, seed: 5 + i });
      expect(body.choices[i].text).toBe(alone.choices[0].text);
    }
    expect(new Set(body.choices.map((c: Json) => c.text)).size).toBeGreaterThan(1);
    expect(body.usage.completion_tokens).toBe(48);
  });

  test("streamed n > 1: each choice's chunks add up to that choice of the non-streamed answer", async () => {
    const req = { prompt: PROMPT, temperature: 0.9, max_tokens: 12, seed: 9, n: 2, speculation: false };
    const whole = await completion(req);
    const { events } = await readSse(await post(app, "/v1/completions", { ...req, stream: true }));
    for (const i of [0, 1]) {
      const mine = events.filter((e) => e.choices[0].index === i);
      expect(mine.map((e) => e.choices[0].text).join("")).toBe(whole.choices[i].text);
      expect(mine.at(-1).choices[0].finish_reason).toBe(whole.choices[i].finish_reason);
    }
  });

  test("top_k 1 and min_p 1 sample the greedy token; repetition_penalty reaches the engine", async () => {
    const greedyText = (await completion({ prompt: PROMPT, ...greedy })).choices[0].text;
    for (const cut of [{ top_k: 1 }, { min_p: 1 }]) {
      expect((await completion({ prompt: PROMPT, temperature: 1.5, max_tokens: 24, seed: 4, ...cut })).choices[0].text).toBe(greedyText);
    }
    const penalized = await completion({ prompt: PROMPT, ...greedy, repetition_penalty: 1.8 });
    const ref = await llm.generate(PROMPT, { temperature: 0, maxNewTokens: 24, repetitionPenalty: 1.8 });
    expect(penalized.choices[0].text).toBe(ref.text);
    expect(penalized.choices[0].text).not.toBe(greedyText);
  });

  test("the same seed gives the same sample; n > 1 without a seed gives different ones", async () => {
    const req = { prompt: PROMPT, temperature: 1, max_tokens: 16, seed: 11, speculation: false };
    expect((await completion(req)).choices[0].text).toBe((await completion(req)).choices[0].text);
    const unseeded = await completion({ prompt: PROMPT, temperature: 1, max_tokens: 16, n: 4 });
    expect(new Set(unseeded.choices.map((c: Json) => c.text)).size).toBeGreaterThan(1);
  });

  test("a stop string is never returned, also when one speculative step accepted tokens past it", async () => {
    const spec = { speculation: { tree: "1,1,3" } };
    const full = await completion({ prompt: PROMPT, temperature: 0, max_tokens: 48, logprobs: 0, ...spec });
    const { tokens, text_offset: offsets } = full.choices[0].logprobs;
    const text: string = full.choices[0].text;
    expect(tokens.join("")).toBe(text);
    // A drafted token (accepted in a step with the tokens around it) whose text, with
    // the next token's, first occurs where that token starts.
    const k = full.choices[0].from_draft.findIndex(
      (d: boolean, i: number) => d && i + 1 < tokens.length && (tokens[i] + tokens[i + 1]).trim() !== "" && text.indexOf(tokens[i] + tokens[i + 1]) === offsets[i],
    );
    expect(k).toBeGreaterThan(0);
    const stop = tokens[k] + tokens[k + 1];
    const want = text.slice(0, offsets[k]);
    const cut = await completion({ prompt: PROMPT, temperature: 0, max_tokens: 48, stop, ...spec });
    expect(cut.choices[0].text).toBe(want);
    expect(cut.choices[0].finish_reason).toBe("stop");
    const { events } = await readSse(await post(app, "/v1/completions", { prompt: PROMPT, temperature: 0, max_tokens: 48, stop: [stop, "never"], stream: true, ...spec }));
    expect(events.map((e) => e.choices[0].text).join("")).toBe(want);
    expect(events.at(-1).choices[0].finish_reason).toBe("stop");
  });

  test("chat logprobs are the target model's log-softmax (specinfer logits) within 1e-4, top alternatives in order", async () => {
    const messages = [{ role: "user", content: "Speak." }];
    const body = await chat({ messages, temperature: 0, max_tokens: 5, ignore_eos: true, logprobs: true, top_logprobs: 3 });
    const prompt = llm.chatPrompt(messages);
    const ids: number[] = body.choices[0].token_ids;
    const content = body.choices[0].logprobs.content;
    expect(content).toHaveLength(5);
    const refs = await Promise.all(ids.map((_, k) => targetLogSoftmax([...prompt, ...ids.slice(0, k)])));
    for (let k = 0; k < ids.length; k++) {
      const ref = refs[k];
      expect(Math.abs(content[k].logprob - ref[ids[k]])).toBeLessThan(1e-4);
      const best = Array.from(ref.keys()).sort((a, b) => ref[b] - ref[a]).slice(0, 3);
      expect(content[k].top_logprobs).toHaveLength(3);
      content[k].top_logprobs.forEach((t: Json, j: number) => expect(Math.abs(t.logprob - ref[best[j]])).toBeLessThan(1e-4));
      expect(content[k].bytes).toEqual([...new TextEncoder().encode(content[k].token)]);
    }
    expect(content.map((c: Json) => c.token).join("")).toBe(body.choices[0].message.content);
  });

  test("completion logprobs use the legacy shape; streamed chunks carry the same values", async () => {
    const req = { prompt: PROMPT, temperature: 0, max_tokens: 8, ignore_eos: true, logprobs: 2 };
    const lp = (await completion(req)).choices[0].logprobs;
    expect(lp.tokens).toHaveLength(8);
    expect(lp.token_logprobs.every((v: number) => v <= 0)).toBe(true);
    expect(lp.top_logprobs.every((t: Json) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2)).toBe(true);
    // Greedy: the chosen token is the most likely one.
    lp.top_logprobs.forEach((t: Json, k: number) => expect(Math.max(...(Object.values(t) as number[]))).toBeCloseTo(lp.token_logprobs[k], 6));
    let offset = 0;
    lp.tokens.forEach((t: string, k: number) => {
      expect(lp.text_offset[k]).toBe(offset);
      offset += t.length;
    });
    const { events } = await readSse(await post(app, "/v1/completions", { ...req, stream: true }));
    const streamed = events.filter((e) => e.choices[0].logprobs).map((e) => e.choices[0].logprobs);
    expect(streamed.flatMap((s) => s.token_logprobs)).toEqual(lp.token_logprobs);
    expect(streamed.flatMap((s) => s.text_offset)).toEqual(lp.text_offset);
  });

  test("logit_bias +100 makes a token the only choice; presence/frequency penalties change greedy text as the engine computes them", async () => {
    const forced = 100;
    const biased = await completion({ prompt: PROMPT, temperature: 0, max_tokens: 6, ignore_eos: true, logit_bias: { [forced]: 100 } });
    expect(biased.choices[0].text).toBe(llm.tokenizer.decode(Array(6).fill(forced)));

    const plain = await completion({ prompt: PROMPT, temperature: 0, max_tokens: 40, ignore_eos: true });
    for (const [field, option] of [["presence_penalty", "presencePenalty"], ["frequency_penalty", "frequencyPenalty"]] as const) {
      const body = await completion({ prompt: PROMPT, temperature: 0, max_tokens: 40, ignore_eos: true, [field]: 2 });
      const ref = await llm.generate(PROMPT, { temperature: 0, maxNewTokens: 40, ignoreEos: true, [option]: 2 });
      expect(body.choices[0].text).toBe(ref.text);
      expect(body.choices[0].text).not.toBe(plain.choices[0].text);
    }
  });

  test("speculation: false decodes without drafts; a fixed tree drafts; both and the default (auto) give the same greedy text", async () => {
    const off = await completion({ prompt: PROMPT, ...greedy, speculation: false });
    const on = await completion({ prompt: PROMPT, ...greedy });
    const fixed = await completion({ prompt: PROMPT, ...greedy, speculation: { tree: "1,1,3" } });
    expect(on.choices[0].text).toBe(off.choices[0].text);
    expect(fixed.choices[0].text).toBe(off.choices[0].text);
    expect(off.speculation).toEqual({ draft_tokens: 0, accepted_tokens: 0, mean_accepted_length: expect.any(Number) });
    expect(off.choices[0].from_draft.some((d: boolean) => d)).toBe(false);
    // Tokens accepted past max_tokens count in the step's stats but are not emitted.
    for (const spec of [on, fixed]) expect(spec.speculation.accepted_tokens).toBeGreaterThanOrEqual(spec.choices[0].from_draft.filter((d: boolean) => d).length);
    // "auto" may find drafting not worth it on this machine; a fixed tree always drafts.
    expect(fixed.speculation.draft_tokens).toBeGreaterThan(0);
    expect(fixed.speculation.mean_accepted_length).toBeGreaterThan(1);
  });
});

describe("streams and the engine", () => {
  test("a client that stops reading a stream cancels its request and frees its KV blocks", async () => {
    const res = await post(app, "/v1/completions", { prompt: PROMPT, temperature: 0, max_tokens: 200, ignore_eos: true, stream: true });
    const reader = res.body!.getReader();
    await reader.read();
    expect((await llm.stats()).running).toBe(1);
    const before = (await llm.stats()).generatedTokens;
    await reader.cancel();
    await expectPoolFull(llm);
    const metrics = await (await app.request("/metrics")).text();
    expect(metric(metrics, "specinfer_kv_cache_blocks_used")).toBe(0);
    // Cancelled well before its 200 tokens.
    expect((await llm.stats()).generatedTokens - before).toBeLessThan(150);
  });

  test("an engine failure mid-stream arrives as an SSE error event and ends the stream", async () => {
    const res = await post(app, "/v1/completions", { prompt: PROMPT, temperature: 0, max_tokens: 200, ignore_eos: true, stream: true });
    const reader = res.body!.getReader();
    await reader.read();
    llm.injectFault("injected step failure");
    let rest = "";
    for (let r = await reader.read(); !r.done; r = await reader.read()) rest += new TextDecoder().decode(r.value);
    const lastEvent = JSON.parse(rest.trim().split("\n\n").at(-1)!.slice("data: ".length));
    expect(lastEvent.error.message).toContain("injected step failure");
    expect(lastEvent.error.type).toBe("server_error");
    expect(rest).not.toContain("[DONE]");
    // The engine serves the next request.
    expect((await completion({ prompt: PROMPT, ...greedy })).choices[0].text.length).toBeGreaterThan(0);
  });

  test("an engine failure in a non-streamed request is a 500 in OpenAI's shape", async () => {
    llm.injectFault("injected step failure");
    const res = await post(app, "/v1/completions", { prompt: PROMPT, max_tokens: 50, n: 2 });
    expect(res.status).toBe(500);
    const body = (await res.json()) as Json;
    expect(body.error.message).toContain("injected step failure");
    expect(body.error.type).toBe("server_error");
  });

  test("/metrics counts tokens, latencies and speculation as Prometheus text", async () => {
    const before = await (await app.request("/metrics")).text();
    const body = await completion({ prompt: PROMPT, ...greedy, speculation: { tree: "1,1,1" } });
    const res = await app.request("/metrics");
    expect(res.headers.get("Content-Type")).toContain("text/plain");
    const after = await res.text();
    const delta = (name: string) => metric(after, name) - metric(before, name);
    expect(delta("specinfer_generation_tokens_total")).toBe(body.usage.completion_tokens);
    expect(delta("specinfer_prompt_tokens_total")).toBe(body.usage.prompt_tokens);
    expect(delta("specinfer_time_to_first_token_seconds_count")).toBe(1);
    expect(delta("specinfer_e2e_request_latency_seconds_count")).toBe(1);
    expect(delta("specinfer_inter_token_latency_seconds_count")).toBe(body.usage.completion_tokens - 1);
    expect(delta("specinfer_spec_decode_num_draft_tokens_total")).toBe(body.speculation.draft_tokens);
    expect(delta("specinfer_spec_decode_num_accepted_tokens_total")).toBe(body.speculation.accepted_tokens);
    expect(delta("specinfer_spec_decode_num_drafts_total")).toBeGreaterThan(0);
    expect(metric(after, 'specinfer_spec_decode_num_accepted_tokens_per_pos_total{position="0"}')).toBeGreaterThan(0);
    expect(metric(after, "specinfer_kv_cache_blocks_total")).toBeGreaterThan(0);
    for (const name of ["specinfer_num_requests_running", "specinfer_num_requests_waiting", "specinfer_num_preemptions_total"]) expect(after).toContain(`# TYPE ${name}`);
  });
});

// Every refusal the API makes, in OpenAI's error shape, naming what is wrong; and the
// server state that goes with them (loading, API key, queue limit).

import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { LLM } from "../../src/index";
import { createApp } from "../../src/server/app";
import { expectPoolFull, post, SERVED, type Json } from "./helpers";

const llm = await LLM.load(undefined, { worker: false });
const app = createApp(llm, { servedModelName: SERVED, maxBodyBytes: 64 * 1024 });
afterEach(() => expectPoolFull(llm));
afterAll(() => llm.close());

function expectError(body: Json, param: string | null, message: RegExp): void {
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"]);
  expect(body.error.param).toBe(param);
  expect(body.error.message).toMatch(message);
}

const chatBody = { messages: [{ role: "user", content: "Hail" }], max_tokens: 4 };
const context = () => llm.info.contextLength;

describe("400 names the parameter", () => {
  const cases: [string, string, Json, string | null, RegExp][] = [
    ["a wrong type", "/v1/completions", { prompt: "x", temperature: "hot" }, "temperature", /temperature/],
    ["a value out of range", "/v1/completions", { prompt: "x", top_p: 1.5 }, "top_p", /top_p/],
    ["a negative max_tokens", "/v1/chat/completions", { ...chatBody, max_tokens: -1 }, "max_tokens", /max_tokens/],
    ["n beyond the limit", "/v1/completions", { prompt: "x", n: 1000 }, "n", /n/],
    ["empty messages", "/v1/chat/completions", { messages: [] }, "messages", /at least one message/],
    ["a missing prompt", "/v1/completions", { max_tokens: 3 }, "prompt", /prompt/],
    ["a prompt of the wrong shape", "/v1/completions", { prompt: [1, "a"] }, "prompt", /prompt/],
    ["an unknown role", "/v1/chat/completions", { messages: [{ role: "wizard", content: "x" }] }, "messages[0].role", /role/],
    ["an image content part", "/v1/chat/completions", { messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }] }, "messages[0].content[0]", /text content/],
    ["tools", "/v1/chat/completions", { ...chatBody, tools: [{ type: "function", function: { name: "f" } }] }, "tools", /not supported/],
    ["a JSON response format", "/v1/chat/completions", { ...chatBody, response_format: { type: "json_object" } }, "response_format", /not supported/],
    ["echo", "/v1/completions", { prompt: "x", echo: true }, "echo", /not supported/],
    ["top_logprobs without logprobs", "/v1/chat/completions", { ...chatBody, top_logprobs: 2 }, "top_logprobs", /logprobs/],
    ["a bad speculation value", "/v1/completions", { prompt: "x", speculation: "sometimes" }, "speculation", /speculation/],
    ["a tree shape the engine rejects", "/v1/completions", { prompt: "x", speculation: { tree: "bad" } }, "speculation", /tree shape/],
    ["a logit_bias token outside the vocabulary", "/v1/completions", { prompt: "x", logit_bias: { "999999": 5 } }, "logit_bias", /outside the vocabulary/],
    ["prompt token ids outside the vocabulary", "/v1/completions", { prompt: [1, 999999] }, "prompt", /outside the vocabulary/],
    ["a bad stop list", "/v1/completions", { prompt: "x", stop: [""] }, "stop[0]", /stop/],
  ];
  for (const [what, path, body, param, message] of cases) {
    test(`${what} (${param})`, async () => {
      const res = await post(app, path, body);
      expect(res.status).toBe(400);
      const json = (await res.json()) as Json;
      expect(json.error.type).toBe("invalid_request_error");
      expectError(json, param, message);
    });
  }

  test("prompt + max_tokens past the context names max_tokens; a prompt alone past it names the prompt", async () => {
    const res = await post(app, "/v1/completions", { prompt: [1, 2, 3, 4], max_tokens: context() });
    expect(res.status).toBe(400);
    expectError((await res.json()) as Json, "max_tokens", /context/);
    const chat = await post(app, "/v1/chat/completions", { ...chatBody, max_tokens: undefined, max_completion_tokens: context() });
    expectError((await chat.json()) as Json, "max_completion_tokens", /context/);
    const long = await post(app, "/v1/completions", { prompt: Array(context()).fill(5), max_tokens: 1 });
    expect(long.status).toBe(400);
    expectError((await long.json()) as Json, "prompt", /context/);
    // Room for the prompt but not for one speculative step: the engine refuses it.
    const noTreeRoom = await post(app, "/v1/completions", { prompt: Array(context() - 2).fill(5), speculation: { tree: "1,1,3" } });
    expect(noTreeRoom.status).toBe(400);
    expectError((await noTreeRoom.json()) as Json, "prompt", /speculative step/);
  });

  test("malformed JSON and a body not labelled JSON are 400s", async () => {
    const bad = await app.request("/v1/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body: '{"prompt": "x",' });
    expect(bad.status).toBe(400);
    expectError((await bad.json()) as Json, null, /Malformed JSON/);
    const text = await app.request("/v1/completions", { method: "POST", headers: { "Content-Type": "text/plain" }, body: '{"prompt":"x"}' });
    expect(text.status).toBe(400);
    expectError((await text.json()) as Json, null, /Content-Type: application\/json/);
  });

  test("unknown fields are ignored, default values of unsupported parameters are accepted", async () => {
    const res = await post(app, "/v1/chat/completions", { ...chatBody, frobnicate: 3, tools: [], tool_choice: "none", response_format: { type: "text" } });
    expect(res.status).toBe(200);
  });
});

describe("status codes", () => {
  test("an unknown model is a 404 naming the model", async () => {
    const res = await post(app, "/v1/completions", { model: "gpt-9", prompt: "x" });
    expect(res.status).toBe(404);
    const body = (await res.json()) as Json;
    expectError(body, "model", /gpt-9/);
    expect(body.error.code).toBe("model_not_found");
  });

  test("a body over the size limit is a 413", async () => {
    const res = await post(app, "/v1/completions", { prompt: "x".repeat(100 * 1024) });
    expect(res.status).toBe(413);
    expectError((await res.json()) as Json, null, /limit/);
  });

  test("an unknown route is a JSON 404 and a wrong method a JSON 405 with Allow", async () => {
    const missing = await app.request("/v1/nothing");
    expect(missing.status).toBe(404);
    expectError((await missing.json()) as Json, null, /no route/);
    const wrong = await app.request("/v1/chat/completions");
    expect(wrong.status).toBe(405);
    expect(wrong.headers.get("Allow")).toBe("POST");
    expectError((await wrong.json()) as Json, null, /GET is not allowed/);
    expect((await app.request("/v1/models", { method: "DELETE" })).status).toBe(405);
  });

  test("GET /v1/models lists the served model", async () => {
    const body = (await (await app.request("/v1/models")).json()) as Json;
    expect(body.object).toBe("list");
    expect(body.data.map((m: Json) => m.id)).toEqual([SERVED]);
    expect((await app.request(`/v1/models/${SERVED}`)).status).toBe(200);
    expect((await app.request("/v1/models/other")).status).toBe(404);
  });
});

describe("server state", () => {
  test("/health and the API answer 503 while the model loads, then 200 {status: ok}", async () => {
    let resolve!: (v: LLM) => void;
    const loading = createApp(new Promise<LLM>((r) => (resolve = r)), { servedModelName: SERVED });
    const health = await loading.request("/health");
    expect(health.status).toBe(503);
    expectError((await health.json()) as Json, null, /loading/);
    expect((await post(loading, "/v1/completions", { prompt: "x" })).status).toBe(503);
    resolve(llm);
    await Bun.sleep(0);
    const ready = await loading.request("/health");
    expect(ready.status).toBe(200);
    expect((await ready.json()) as Json).toEqual({ status: "ok" });
    expect((await post(loading, "/v1/completions", { prompt: "x", max_tokens: 2 })).status).toBe(200);
  });

  test("a model that fails to load keeps /health at 503 with the reason", async () => {
    const failed = createApp(Promise.reject(new Error("no such file: /nowhere")), { servedModelName: SERVED });
    await Bun.sleep(0);
    const res = await failed.request("/health");
    expect(res.status).toBe(503);
    expectError((await res.json()) as Json, null, /failed to load: no such file/);
  });

  test("with an API key every route but /health needs the bearer token", async () => {
    const locked = createApp(llm, { servedModelName: SERVED, apiKey: "s3cret" });
    expect((await locked.request("/health")).status).toBe(200);
    const missing = await locked.request("/v1/models");
    expect(missing.status).toBe(401);
    expectError((await missing.json()) as Json, null, /missing API key/);
    const wrong = await locked.request("/v1/models", { headers: { Authorization: "Bearer s3cre" } });
    expect(wrong.status).toBe(401);
    expect(((await wrong.json()) as Json).error.type).toBe("authentication_error");
    expect((await locked.request("/metrics")).status).toBe(401);
    expect((await locked.request("/v1/nothing")).status).toBe(401);
    expect((await locked.request("/v1/models", { headers: { Authorization: "Bearer s3cret" } })).status).toBe(200);
    expect((await post(locked, "/v1/completions", { prompt: "x", max_tokens: 2 }, { Authorization: "Bearer s3cret" })).status).toBe(200);
  });

  test("past the in-flight limit a request gets a 429 with Retry-After; once done, requests pass again", async () => {
    const limited = createApp(llm, { servedModelName: SERVED, maxInFlight: 2 });
    const long = { prompt: "x", temperature: 0, max_tokens: 100, ignore_eos: true };
    // A streamed response starts once its generations are admitted.
    const running = await post(limited, "/v1/completions", { ...long, n: 2, stream: true });
    const refused = await post(limited, "/v1/completions", { prompt: "x", max_tokens: 2 });
    expect(refused.status).toBe(429);
    expect(refused.headers.get("Retry-After")).toBe("1");
    expect(((await refused.json()) as Json).error.type).toBe("rate_limit_error");
    expect(await running.text()).toEndWith("data: [DONE]\n\n");
    expect((await post(limited, "/v1/completions", { prompt: "x", max_tokens: 2 })).status).toBe(200);
  });
});

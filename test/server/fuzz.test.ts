// Fuzzed requests against a real server (Bun.serve on 127.0.0.1, engine in its Worker):
// seeded fast-check bodies with wrong types, missing and extra fields, huge numbers and
// strings, invalid UTF-8 and deep nesting, plus half-sent and slow bodies over raw
// sockets. Every body is answered with a 4xx in OpenAI's error shape, or a well-formed
// 200 when the generated body happens to be valid; after each batch the server still
// answers /health and serves a normal request, with every KV block back in the pool.
// Replay a failure with FUZZ_SEED=<seed printed by fast-check>.

import { afterAll, afterEach, describe, expect, test } from "bun:test";
import fc from "fast-check";
import { connect } from "node:net";
import { LLM } from "../../src/index";
import { createApp } from "../../src/server/app";
import { listen } from "../../src/server/listen";
import { expectPoolFull, SERVED, type Json } from "./helpers";

const SEED = Number(process.env.FUZZ_SEED ?? 20261203);
const MAX_BODY = 64 * 1024;
const IDLE_SECONDS = 2;

const llm = await LLM.load(undefined, { measure: false });
const server = listen(createApp(llm, { servedModelName: SERVED, maxBodyBytes: MAX_BODY }), {
  hostname: "127.0.0.1",
  port: 0,
  idleTimeout: IDLE_SECONDS,
  maxBodyBytes: MAX_BODY,
});
const base = `http://127.0.0.1:${server.port}`;
afterEach(async () => {
  await expectStillServing();
  await expectPoolFull(llm);
});
afterAll(async () => {
  server.stop(true);
  await llm.close();
});

const runs = (numRuns: number) => ({ seed: SEED, numRuns, endOnFailure: true });

const ROUTES = {
  completions: { path: "/v1/completions", body: { model: SERVED, prompt: "ROMEO:", max_tokens: 2 } },
  chat: { path: "/v1/chat/completions", body: { model: SERVED, messages: [{ role: "user", content: "Speak." }], max_tokens: 2 } },
} as const;
type Route = keyof typeof ROUTES;
const route = fc.constantFrom<Route>("completions", "chat");

interface Answer {
  status: number;
  contentType: string;
  text: string;
}

async function send(path: string, body: string | Uint8Array, contentType = "application/json"): Promise<Answer> {
  // A fresh connection per request: a pooled one the server closed after an earlier
  // answer (idle timeout, a 413) races the next send and reads as a reset (seen once in CI).
  const res = await fetch(base + path, { method: "POST", headers: { "Content-Type": contentType }, body, keepalive: false });
  return { status: res.status, contentType: res.headers.get("Content-Type") ?? "", text: await res.text() };
}

/** OpenAI's error shape: {"error":{"message","type","param","code"}}, a message that says something. */
function expectErrorShape(text: string): Json {
  const body = JSON.parse(text);
  expect(Object.keys(body)).toEqual(["error"]);
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"]);
  expect(typeof body.error.message).toBe("string");
  expect(body.error.message.length).toBeGreaterThan(0);
  expect(typeof body.error.type).toBe("string");
  expect(body.error.param === null || typeof body.error.param === "string").toBe(true);
  expect(body.error.code === null || typeof body.error.code === "string").toBe(true);
  return body.error;
}

/** A 200 must be a whole answer: JSON with choices and usage, or SSE ending in [DONE]. */
function expectValidAnswer(a: Answer, which: Route): void {
  if (a.contentType.startsWith("text/event-stream")) {
    expect(a.text).toEndWith("data: [DONE]\n\n");
    return;
  }
  const body = JSON.parse(a.text);
  expect(body.object).toBe(which === "chat" ? "chat.completion" : "text_completion");
  expect(body.choices.length).toBeGreaterThan(0);
  for (const c of body.choices) {
    expect(typeof (which === "chat" ? c.message.content : c.text)).toBe("string");
    expect(["stop", "length"]).toContain(c.finish_reason);
  }
  expect(body.usage.completion_tokens).toBeGreaterThanOrEqual(0);
}

/** The property every fuzzed body must hold: a 4xx in OpenAI's shape or a valid 200. */
function expectRefusedOrServed(a: Answer, which: Route): void {
  if (a.status === 200) return expectValidAnswer(a, which);
  if (a.status < 400 || a.status >= 500) throw new Error(`expected a 4xx or a 200, got ${a.status}: ${a.text.slice(0, 300)}`);
  expectErrorShape(a.text);
}

async function expectStillServing(): Promise<void> {
  const health = await fetch(`${base}/health`);
  expect(health.status).toBe(200);
  expect(await health.json()).toEqual({ status: "ok" });
  const res = await fetch(`${base}/v1/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: "ROMEO:", max_tokens: 4, ignore_eos: true, temperature: 0 }),
  });
  expect(res.status).toBe(200);
  expect(((await res.json()) as Json).usage.completion_tokens).toBe(4);
}

// ---- generated values ----

const hugeNumber = fc.constantFrom(1e308, -1e308, 2 ** 53 + 2, -(2 ** 63), 1e21, 5e-324, 123456789.5);
const notNumber = fc.oneof(fc.string({ maxLength: 8 }), fc.boolean(), fc.array(fc.integer(), { maxLength: 3 }), fc.dictionary(fc.string({ maxLength: 4 }), fc.integer(), { maxKeys: 2 }));
const notBoolean = fc.oneof(fc.string({ maxLength: 8 }), fc.integer(), fc.array(fc.boolean(), { maxLength: 2 }));
const notString = fc.oneof(fc.integer(), fc.boolean(), fc.array(fc.string(), { maxLength: 2 }), fc.object({ maxDepth: 1 }));
const notInteger = fc.oneof(notNumber, fc.double({ noInteger: true, noNaN: true, noDefaultInfinity: true }), hugeNumber.filter((v) => !Number.isSafeInteger(v)));
const outside = (lo: number, hi: number) => fc.oneof(fc.double({ max: lo, maxExcluded: true, noNaN: true, noDefaultInfinity: true }), fc.double({ min: hi, minExcluded: true, noNaN: true, noDefaultInfinity: true }));

/** Per typed field: values it must refuse (400 naming the field). Null is allowed
 *  everywhere (it means the default), so it is never one of them. */
const COMMON_BAD: Record<string, fc.Arbitrary<unknown>> = {
  max_tokens: fc.oneof(notInteger, fc.integer({ max: 0 }), fc.integer({ min: 100_000 })),
  temperature: fc.oneof(notNumber, outside(0, 2)),
  top_p: fc.oneof(notNumber, outside(Number.MIN_VALUE, 1)),
  n: fc.oneof(notInteger, fc.integer({ max: 0 }), fc.integer({ min: 17 })),
  seed: notInteger,
  stop: fc.oneof(fc.integer(), fc.boolean(), fc.constant(""), fc.constant([""]), fc.array(fc.string({ minLength: 1 }), { minLength: 17, maxLength: 20 }), fc.array(fc.integer(), { minLength: 1, maxLength: 2 })),
  stream: notBoolean,
  stream_options: fc.oneof(notString.filter((v) => typeof v !== "object" || Array.isArray(v)), fc.record({ include_usage: notBoolean })),
  presence_penalty: fc.oneof(notNumber, outside(-2, 2)),
  frequency_penalty: fc.oneof(notNumber, outside(-2, 2)),
  logit_bias: fc.oneof(fc.integer(), fc.string(), fc.record({ x: fc.integer() }), fc.record({ "5": notNumber }), fc.record({ "5": outside(-100, 100) }), fc.constant({ "99999999": 1 })),
  user: notString,
  top_k: fc.oneof(notInteger, fc.integer({ max: -2 })),
  min_p: fc.oneof(notNumber, outside(0, 1)),
  repetition_penalty: fc.oneof(notNumber, outside(0.01, 100)),
  ignore_eos: notBoolean,
  speculation: fc.oneof(fc.constant(true), fc.constant("on"), fc.integer(), fc.record({ tree: fc.integer() }), fc.record({ bogus: fc.boolean() }), fc.record({ tree: fc.constantFrom("", "0", "x,y", "-1") })),
  model: notString,
};
const ROUTE_BAD: Record<Route, Record<string, fc.Arbitrary<unknown>>> = {
  completions: {
    prompt: fc.oneof(fc.integer(), fc.boolean(), fc.constant([]), fc.constant([[]]), fc.array(fc.integer({ max: -1 }), { minLength: 1, maxLength: 3 }), fc.constant([1.5]), fc.constant([1, "a"]), fc.constant([5, 9_999_999])),
    logprobs: fc.oneof(notInteger, fc.integer({ max: -1 }), fc.integer({ min: 21 })),
    echo: fc.constant(true),
    suffix: fc.string({ minLength: 1, maxLength: 5 }),
    best_of: fc.integer({ min: 2, max: 5 }),
  },
  chat: {
    messages: fc.oneof(fc.constant([]), notString.filter((v) => !Array.isArray(v)), fc.constant([{ role: "wizard", content: "x" }]), fc.constant([{ content: "x" }]), fc.constant([{ role: "user", content: 5 }]), fc.constant([{ role: "user", content: [{ type: "image_url" }] }])),
    logprobs: notBoolean,
    max_completion_tokens: fc.oneof(notInteger, fc.integer({ max: 0 })),
    tools: fc.constant([{ type: "function", function: { name: "f" } }]),
    response_format: fc.constant({ type: "json_object" }),
  },
};

/** A body with one field set to a value that field must refuse. */
const badField = route.chain((which) => {
  const table = { ...COMMON_BAD, ...ROUTE_BAD[which] };
  return fc.constantFrom(...Object.keys(table)).chain((field) => table[field].map((value) => ({ which, field, value })));
});

/** JSON values of any shape, including keys that mean something to JS objects. */
const anyJson = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    fc.constant(null),
    fc.boolean(),
    fc.integer(),
    fc.double({ noNaN: true, noDefaultInfinity: true }),
    hugeNumber,
    fc.string({ maxLength: 12 }),
    fc.string({ unit: "binary", maxLength: 12 }),
    fc.array(tie("value"), { maxLength: 4 }),
    fc.dictionary(fc.oneof(fc.string({ maxLength: 6 }), fc.constantFrom("__proto__", "constructor", "prototype", "toString")), tie("value"), { maxKeys: 4 }),
  ),
})).value;

const FIELDS = [...new Set([...Object.keys(COMMON_BAD), ...Object.keys(ROUTE_BAD.completions), ...Object.keys(ROUTE_BAD.chat)])];

/** A valid body changed in a few random ways: fields dropped, set to anything, added. */
const mutatedBody = route.chain((which) =>
  fc
    .array(
      fc.oneof(
        fc.record({ op: fc.constant("drop" as const), key: fc.constantFrom(...Object.keys(ROUTES[which].body)) }),
        fc.record({ op: fc.constant("set" as const), key: fc.constantFrom(...FIELDS), value: anyJson }),
        fc.record({ op: fc.constant("add" as const), key: fc.string({ maxLength: 10 }), value: anyJson }),
      ),
      { minLength: 1, maxLength: 4 },
    )
    .map((ops) => {
      const body: Record<string, unknown> = { ...ROUTES[which].body };
      for (const o of ops) {
        if (o.op === "drop") delete body[o.key];
        else Object.defineProperty(body, o.key, { value: o.value, enumerable: true, writable: true, configurable: true });
      }
      return { which, body };
    }),
);

/** Nested arrays or objects `depth` deep, as JSON text. */
const nested = (depth: number, kind: "array" | "object") =>
  kind === "array" ? "[".repeat(depth) + "1" + "]".repeat(depth) : '{"a":'.repeat(depth) + "1" + "}".repeat(depth);

const utf8 = new TextEncoder();

// ---- the properties ----

describe("fuzzed JSON bodies", () => {
  test("a field of the wrong type or out of range is a 400 naming that field", async () => {
    await fc.assert(
      fc.asyncProperty(badField, async ({ which, field, value }) => {
        const a = await send(ROUTES[which].path, JSON.stringify({ ...ROUTES[which].body, [field]: value }));
        expect(a.status).toBe(400);
        const error = expectErrorShape(a.text);
        expect(error.type).toBe("invalid_request_error");
        expect(String(error.param)).toStartWith(field);
      }),
      runs(250),
    );
  });

  test("a missing required field is a 400 naming it; a non-object body is a 400", async () => {
    for (const which of ["completions", "chat"] as const) {
      const required = which === "chat" ? "messages" : "prompt";
      const { [required]: _, ...rest } = ROUTES[which].body as Record<string, unknown>;
      const a = await send(ROUTES[which].path, JSON.stringify(rest));
      expect(a.status).toBe(400);
      expect(expectErrorShape(a.text).param).toBe(required);
    }
    await fc.assert(
      fc.asyncProperty(route, anyJson.filter((v) => v === null || typeof v !== "object" || Array.isArray(v)), async (which, value) => {
        const a = await send(ROUTES[which].path, JSON.stringify(value));
        expect(a.status).toBe(400);
        expectErrorShape(a.text);
      }),
      runs(60),
    );
  });

  test("random drops, replacements and extra fields (prototype keys included) get a 4xx or a valid 200", async () => {
    await fc.assert(
      fc.asyncProperty(mutatedBody, async ({ which, body }) => {
        expectRefusedOrServed(await send(ROUTES[which].path, JSON.stringify(body)), which);
      }),
      runs(300),
    );
  });
});

describe("fuzzed bytes", () => {
  test("a body cut anywhere is a 400 (malformed JSON)", async () => {
    const texts = (Object.keys(ROUTES) as Route[]).map((w) => [w, JSON.stringify({ ...ROUTES[w].body, temperature: 0.5, stop: ["\n\n"] })] as const);
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...texts), fc.nat(), async ([which, text], at) => {
        const a = await send(ROUTES[which].path, text.slice(0, at % text.length));
        expect(a.status).toBe(400);
        expectErrorShape(a.text);
      }),
      runs(80),
    );
  });

  test("invalid UTF-8 anywhere in the body is a 400 saying so", async () => {
    const invalid = fc.constantFrom([0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xe2, 0x82], [0x80]);
    await fc.assert(
      fc.asyncProperty(route, fc.nat(), invalid, async (which, at, bad) => {
        const text = utf8.encode(JSON.stringify(ROUTES[which].body));
        const cut = at % (text.length + 1);
        const bytes = new Uint8Array([...text.subarray(0, cut), ...bad, ...text.subarray(cut)]);
        const a = await send(ROUTES[which].path, bytes);
        expect(a.status).toBe(400);
        expect(expectErrorShape(a.text).message).toContain("UTF-8");
      }),
      runs(60),
    );
  });

  test("number literals past double range or precision get a 4xx or a valid 200", async () => {
    const literal = fc.constantFrom("1e999", "-1e999", "123456789012345678901234567890", "1e-999", "-0", "0.0000000000000000000001", "9007199254740993", "1E400");
    await fc.assert(
      fc.asyncProperty(route, fc.constantFrom(...FIELDS), literal, async (which, field, lit) => {
        const text = JSON.stringify(ROUTES[which].body).replace(/}$/, `,"${field}":${lit}}`);
        expectRefusedOrServed(await send(ROUTES[which].path, text), which);
      }),
      runs(80),
    );
  });

  test("deep nesting (up to 100,000 levels) in any field gets a 4xx or a valid 200", async () => {
    await fc.assert(
      fc.asyncProperty(route, fc.constantFrom(...FIELDS, "extra"), fc.integer({ min: 1, max: 100_000 }), fc.constantFrom("array" as const, "object" as const), async (which, field, depth, kind) => {
        const text = JSON.stringify(ROUTES[which].body).replace(/}$/, `,"${field}":${nested(depth, kind)}}`);
        if (text.length > MAX_BODY) return expect((await send(ROUTES[which].path, text)).status).toBe(413);
        expectRefusedOrServed(await send(ROUTES[which].path, text), which);
      }),
      runs(40),
    );
  });

  test("huge strings in any field: a 413 over the body limit, else a 4xx or a valid 200", async () => {
    const huge = fc.tuple(fc.string({ minLength: 1, maxLength: 3, unit: "grapheme" }), fc.integer({ min: 1000, max: 40_000 })).map(([s, k]) => s.repeat(k));
    await fc.assert(
      fc.asyncProperty(route, fc.constantFrom(...FIELDS, "extra"), huge, async (which, field, value) => {
        const text = JSON.stringify({ ...ROUTES[which].body, [field]: value });
        const a = await send(ROUTES[which].path, text);
        if (utf8.encode(text).length > MAX_BODY) expect(a.status).toBe(413);
        expectRefusedOrServed(a, which);
      }),
      runs(40),
    );
  });

  test("a body not labelled JSON, or empty, is a 400", async () => {
    await fc.assert(
      fc.asyncProperty(route, fc.constantFrom("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "application/jsonx"), async (which, type) => {
        const a = await send(ROUTES[which].path, JSON.stringify(ROUTES[which].body), type);
        expect(a.status).toBe(400);
        expectErrorShape(a.text);
      }),
      runs(20),
    );
    const empty = await send(ROUTES.chat.path, "");
    expect(empty.status).toBe(400);
    expectErrorShape(empty.text);
  });
});

// ---- raw sockets ----

interface RawResult {
  /** Parsed status, or null when the server closed without answering. */
  status: number | null;
  body: string;
  /** Milliseconds from connecting until the connection closed. */
  closedAfterMs: number;
  closedByServer: boolean;
}

/** Writes `chunks` with `gapMs` between them, then waits up to `holdMs` for the server
 *  to answer and close (Connection: close) or to close on its own. */
function rawRequest(chunks: Uint8Array[], gapMs: number, holdMs: number): Promise<RawResult> {
  return new Promise((resolve) => {
    const start = performance.now();
    const socket = connect(server.port!, "127.0.0.1");
    const received: Buffer[] = [];
    let byUs = false;
    socket.on("data", (d: Buffer) => received.push(d));
    socket.on("error", () => {});
    socket.on("close", () => {
      const text = Buffer.concat(received).toString("utf8");
      const status = /^HTTP\/1\.1 (\d{3})/.exec(text)?.[1];
      resolve({ status: status ? Number(status) : null, body: text.slice(text.indexOf("\r\n\r\n") + 4), closedAfterMs: performance.now() - start, closedByServer: !byUs });
    });
    socket.on("connect", async () => {
      for (const c of chunks) {
        if (socket.destroyed) return;
        socket.write(c);
        if (gapMs > 0) await Bun.sleep(gapMs);
      }
      setTimeout(() => {
        byUs = true;
        socket.destroy();
      }, holdMs);
    });
  });
}

const head = (path: string, length: number) =>
  utf8.encode(`POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\nConnection: close\r\n\r\n`);

describe("half-sent and slow bodies over raw sockets", () => {
  test("a client that sends part of the body and stops is cut off after the idle timeout, without an answer, while others are served", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(route, fc.nat()), { minLength: 4, maxLength: 4 }), async (cases) => {
        const stalls = cases.map(([which, at]) => {
          const body = utf8.encode(JSON.stringify(ROUTES[which].body));
          const part = new Uint8Array([...head(ROUTES[which].path, body.length), ...body.subarray(0, at % body.length)]);
          return rawRequest([part], 0, (IDLE_SECONDS + 8) * 1000);
        });
        // While they stall, the server answers everyone else.
        await expectStillServing();
        for (const r of await Promise.all(stalls)) {
          expect(r.closedByServer).toBe(true);
          // No lower bound on when: Bun sweeps idle sockets on its own coarse timer.
          expect(r.status === null || (r.status >= 400 && r.status < 500)).toBe(true);
        }
      }),
      runs(2),
    );
  });

  test("a client that stops inside the request head (or sends nothing) is cut off by Bun's fixed header timeout", async () => {
    const request = head(ROUTES.chat.path, 10);
    const stalls = [new Uint8Array(0), request.subarray(0, 9), request.subarray(0, request.length - 3)].map((part) => rawRequest([part], 0, 25_000));
    await expectStillServing();
    for (const r of await Promise.all(stalls)) {
      expect(r.closedByServer).toBe(true);
      expect(r.status).toBeNull();
    }
  });

  test("a client that sends part of the body and disconnects leaves nothing behind", async () => {
    await fc.assert(
      fc.asyncProperty(route, fc.nat(), async (which, at) => {
        const body = utf8.encode(JSON.stringify({ ...ROUTES[which].body, max_tokens: 50 }));
        const part = new Uint8Array([...head(ROUTES[which].path, body.length), ...body.subarray(0, at % body.length)]);
        const r = await rawRequest([part], 0, 50);
        expect(r.status).toBeNull();
      }),
      runs(20),
    );
  });

  test("a body sent slowly in random pieces (each gap under the idle timeout) is answered as if sent at once", async () => {
    await fc.assert(
      fc.asyncProperty(route, fc.array(fc.nat(), { minLength: 1, maxLength: 6 }), fc.integer({ min: 50, max: 400 }), async (which, cuts, gapMs) => {
        const body = utf8.encode(JSON.stringify({ ...ROUTES[which].body, temperature: 0 }));
        const whole = new Uint8Array([...head(ROUTES[which].path, body.length), ...body]);
        const bounds = [0, ...new Set(cuts.map((c) => c % whole.length).filter((c) => c > 0).sort((a, b) => a - b)), whole.length];
        const pieces = bounds.slice(1).map((end, i) => whole.subarray(bounds[i], end));
        const r = await rawRequest(pieces, gapMs, 10_000);
        expect(r.status).toBe(200);
        expectValidAnswer({ status: 200, contentType: "application/json", text: r.body }, which);
      }),
      runs(8),
    );
  });

  test("a declared length over the body limit is a JSON 413 before the body is sent", async () => {
    const r = await rawRequest([head(ROUTES.completions.path, 50 * 1024 * 1024)], 0, 5000);
    expect(r.status).toBe(413);
    expect(expectErrorShape(r.body).message).toContain(`${MAX_BODY} bytes`);
    expect(r.closedAfterMs).toBeLessThan(4000);
  });
});

describe("regressions found by the fuzzer", () => {
  // A denormal temperature or repetition penalty overflowed the logits to Infinity: the
  // step failed with "sampling: the distribution has no mass", a 500 for every request in it.
  test("a temperature under 1e-5 (5e-324 included) is greedy: a 200 with the greedy text", async () => {
    const greedyText = async (temperature: number) => {
      const a = await send(ROUTES.completions.path, JSON.stringify({ ...ROUTES.completions.body, max_tokens: 8, temperature, ignore_eos: true }));
      expect(a.status).toBe(200);
      return JSON.parse(a.text).choices[0].token_ids;
    };
    const want = await greedyText(0);
    for (const t of [5e-324, 1e-320, 1e-30, 9.9e-6]) expect(await greedyText(t)).toEqual(want);
  });

  test("a repetition_penalty under 0.01 (1e-323 included) is a 400 naming it", async () => {
    for (const penalty of [1e-323, 1e-30, 0.0099]) {
      const a = await send(ROUTES.completions.path, JSON.stringify({ ...ROUTES.completions.body, repetition_penalty: penalty, temperature: 1 }));
      expect(a.status).toBe(400);
      expect(expectErrorShape(a.text).param).toBe("repetition_penalty");
    }
  });
});

describe("regressions found by the fuzzer: bodies over the limit", () => {
  // The 413 was sent before the rest of the body was read; the client, still sending,
  // then saw the connection reset (ECONNRESET) instead of the answer. First fixed for
  // bodies up to 4x the limit; the fuzzer then found resets past that (a 300 KB string
  // against a 64 KB limit), so bodies are drained up to 16 MiB whatever the limit.
  test("a body over the limit (up to 16 MiB) gets the JSON 413, never a reset connection", async () => {
    const oversize = (i: number) => JSON.stringify({ ...ROUTES.completions.body, extra: "x".repeat(MAX_BODY * [1.1, 3.5, 6, 20][i % 4]) });
    for (let round = 0; round < 50; round++) {
      const answers = await Promise.all([0, 1, 2, 3].map((i) => send(ROUTES.completions.path, oversize(i))));
      for (const a of answers) {
        expect(a.status).toBe(413);
        expect(expectErrorShape(a.text).code).toBe("body_too_large");
      }
    }
  });
});

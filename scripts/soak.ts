// Soak test: `npm run soak -- --minutes M [--seed S] [--clients 16] [--kv-memory BYTES]`.
// Starts `specinfer serve` on 127.0.0.1 with a small KV pool (so load preempts) and a
// queue limit, then drives it with concurrent clients mixing streamed and plain
// requests, random sampling parameters, speculation off / auto / fixed trees / n-gram,
// cancellations, disconnects mid-stream and bursts past the queue limit, while a probe
// times /health. Every completed greedy request must equal the same request run alone
// (measured first); at the end no KV block may be in use. Prints one JSON report on
// stdout; exits 1 when a check fails.

import { readFileSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { parseArgs } from "node:util";

const ROOT = join(import.meta.dir, "..");
const SERVED = "soak";

const { values } = parseArgs({
  options: {
    minutes: { type: "string", default: "1" },
    seed: { type: "string" },
    clients: { type: "string", default: "16" },
    "kv-memory": { type: "string", default: String(24 * 37_449) }, // 24 blocks of the embedded model at f16
    "max-seqs": { type: "string", default: "8" },
    "max-queue": { type: "string", default: "8" },
  },
  strict: true,
});

function positive(name: string, integer: boolean): number {
  const v = Number(values[name as keyof typeof values]);
  if (!(v > 0) || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    console.error(`soak: --${name} must be a positive ${integer ? "integer" : "number"}, got "${values[name as keyof typeof values]}"`);
    process.exit(2);
  }
  return v;
}
const minutes = positive("minutes", false);
const clients = positive("clients", true);
const kvMemory = positive("kv-memory", true);
const maxSeqs = positive("max-seqs", true);
const maxQueue = positive("max-queue", true);
const seed = values.seed === undefined ? Date.now() % 2 ** 31 : positive("seed", true);

// ---- seeded randomness (mulberry32) ----

let state = seed >>> 0;
function random(): number {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
}
const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
const between = (lo: number, hi: number) => lo + random() * (hi - lo);
const intBetween = (lo: number, hi: number) => Math.floor(between(lo, hi + 1));

// ---- requests ----

type Body = Record<string, unknown>;
interface Template {
  path: string;
  body: Body;
}

const PROMPTS = ["ROMEO:\n", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:\nOnce more unto", "MENENIUS:\nWhy, masters", "DUKE VINCENTIO:\n"];
const SPECULATION: unknown[] = [false, "auto", { tree: "1,1,3" }, { tree: "dynamic:8" }, { ngram: true }, undefined];

function generationBody(greedy: boolean): Template {
  const chat = random() < 0.4;
  const prompt = pick(PROMPTS);
  const body: Body = chat ? { messages: [{ role: "user", content: prompt }] } : { prompt };
  body.model = SERVED;
  body.max_tokens = intBetween(4, 96);
  body.speculation = pick(SPECULATION);
  if (random() < 0.3) body.ignore_eos = true;
  if (random() < 0.2) body.stop = [pick(["\n\n", "the", ":", "O"])];
  if (random() < 0.2) body.repetition_penalty = Number(between(1, 1.3).toFixed(2));
  if (random() < 0.15) body.n = 2;
  if (greedy) body.temperature = 0;
  else {
    body.temperature = Number(between(0.1, 1.5).toFixed(2));
    if (random() < 0.5) body.top_p = Number(between(0.5, 1).toFixed(2));
    if (random() < 0.5) body.top_k = intBetween(-1, 50);
    if (random() < 0.3) body.min_p = Number(between(0, 0.2).toFixed(2));
    if (random() < 0.3) body.presence_penalty = Number(between(-0.5, 1).toFixed(2));
    if (random() < 0.3) body.frequency_penalty = Number(between(-0.5, 1).toFixed(2));
    if (random() < 0.7) body.seed = intBetween(0, 1e6);
  }
  return { path: chat ? "/v1/chat/completions" : "/v1/completions", body };
}

// ---- the server ----

interface Server {
  proc: ReturnType<typeof Bun.spawn>;
  base: string;
  port: number;
  stderrTail: () => string;
}

async function startServer(): Promise<Server> {
  const proc = Bun.spawn(
    [process.execPath, "src/cli.ts", "serve", "--port", "0", "--served-model-name", SERVED, "--ngram",
      "--kv-memory", String(kvMemory), "--max-seqs", String(maxSeqs), "--max-queue", String(maxQueue)],
    { cwd: ROOT, stdout: "ignore", stderr: "pipe", env: { ...process.env, SPECINFER_API_KEY: "" } },
  );
  let stderr = "";
  const reader = (proc.stderr as ReadableStream<Uint8Array>).getReader();
  const decoder = new TextDecoder();
  let port: number | null = null;
  while (port === null) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`the server exited before listening: ${stderr}`);
    stderr += decoder.decode(value, { stream: true });
    const m = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(stderr);
    if (m) port = Number(m[1]);
  }
  void (async () => {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      stderr = (stderr + decoder.decode(value, { stream: true })).slice(-4000);
    }
  })();
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 600; i++) {
    if ((await fetch(`${base}/health`).catch(() => null))?.status === 200) return { proc, base, port, stderrTail: () => stderr };
    await Bun.sleep(100);
  }
  throw new Error(`the server did not become healthy: ${stderr}`);
}

function rssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

async function metrics(base: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^specinfer_(\w+) ([\d.e+-]+)$/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

// ---- outcomes ----

const counts = { completed: 0, completedGreedy: 0, completedStreamed: 0, cancelled: 0, disconnected: 0, rejected: 0, failed: 0, greedyMismatches: 0, bursts: 0, burstsWith429: 0 };
const failures: string[] = [];
function fail(what: string): void {
  counts.failed++;
  if (failures.length < 20) failures.push(what.slice(0, 400));
}

/** A 429 must be OpenAI-shaped with Retry-After; anything else unexpected is a failure. */
async function refused(res: Response, what: string): Promise<void> {
  const text = await res.text();
  if (res.status !== 429) return fail(`${what}: status ${res.status}: ${text}`);
  const body = JSON.parse(text);
  if (body?.error?.type !== "rate_limit_error" || res.headers.get("Retry-After") === null) return fail(`${what}: malformed 429: ${text}`);
  counts.rejected++;
}

/** Token ids per choice of a JSON answer. */
function choiceTokens(body: any): number[][] {
  return [...body.choices].sort((a: any, b: any) => a.index - b.index).map((c: any) => c.token_ids);
}

/** Token ids per choice of an SSE body; null unless it ends with [DONE] and no error. */
function streamedTokens(text: string): number[][] | null {
  const blocks = text.split("\n\n").filter((b) => b);
  if (blocks.at(-1) !== "data: [DONE]") return null;
  const tokens: number[][] = [];
  for (const b of blocks.slice(0, -1)) {
    const event = JSON.parse(b.slice("data: ".length));
    if (event.error) return null;
    for (const c of event.choices) (tokens[c.index] ??= []).push(...(c.token_ids ?? []));
  }
  return tokens;
}

const json = (path: string, body: Body, signal?: AbortSignal) =>
  fetch(server.base + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal });

/** Runs one request to completion; returns its token ids per choice, or null (counted). */
async function complete(t: Template, stream: boolean): Promise<number[][] | null> {
  const what = `${t.path} ${JSON.stringify({ ...t.body, stream })}`;
  const res = await json(t.path, { ...t.body, stream });
  if (res.status !== 200) {
    await refused(res, what);
    return null;
  }
  const text = await res.text();
  const tokens = stream ? streamedTokens(text) : choiceTokens(JSON.parse(text));
  if (!tokens || tokens.length !== ((t.body.n as number | undefined) ?? 1)) {
    fail(`${what}: malformed answer: ${text.slice(-300)}`);
    return null;
  }
  counts.completed++;
  if (stream) counts.completedStreamed++;
  return tokens;
}

/** Aborts a plain or streamed request after a random delay. */
async function cancelled(t: Template): Promise<void> {
  const stream = random() < 0.5;
  const abort = new AbortController();
  const delay = between(5, 300);
  setTimeout(() => abort.abort(), delay);
  try {
    const res = await json(t.path, { ...t.body, stream }, abort.signal);
    if (res.status !== 200) return refused(res, `cancel ${t.path}`);
    await res.text();
    counts.completed++; // finished before the abort
  } catch (e) {
    if ((e as Error).name !== "AbortError") return fail(`cancel ${t.path}: ${(e as Error).message}`);
    counts.cancelled++;
  }
}

/** A streamed request whose socket is destroyed after its first event (a client crash). */
function disconnected(t: Template): Promise<void> {
  const body = JSON.stringify({ ...t.body, stream: true });
  return new Promise((resolve) => {
    const socket = connect(server.port, "127.0.0.1");
    let seen = "";
    const finish = (outcome: () => void) => {
      socket.destroy();
      outcome();
      resolve();
    };
    socket.on("error", (e) => finish(() => fail(`disconnect: socket error ${e.message}`)));
    socket.on("data", (d) => {
      seen += d.toString("utf8");
      if (/^HTTP\/1\.1 429/.test(seen)) return finish(() => counts.rejected++);
      if (!/^HTTP\/1\.1 (\d+)/.test(seen)) return;
      if (!seen.startsWith("HTTP/1.1 200")) return finish(() => fail(`disconnect: ${seen.slice(0, 300)}`));
      if (seen.includes("data: ")) finish(() => counts.disconnected++);
    });
    socket.on("connect", () => {
      socket.write(`POST ${t.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    });
  });
}

/** Many small requests at once, past the queue limit: some must get a 429. */
async function burst(): Promise<void> {
  const before = counts.rejected;
  counts.bursts++;
  await Promise.all(Array.from({ length: 2 * (maxSeqs + maxQueue) }, () => complete({ path: "/v1/completions", body: { prompt: pick(PROMPTS), max_tokens: 4 } }, false)));
  if (counts.rejected > before) counts.burstsWith429++;
}

// ---- the run ----

const server = await startServer();
process.stderr.write(`soak: server at ${server.base} (seed ${seed}), computing greedy references alone\n`);

// Greedy requests the clients repeat, each first run alone for its reference.
const greedyTemplates = Array.from({ length: 24 }, () => generationBody(true));
const alone = new Map<Template, number[][]>();
for (const t of greedyTemplates) {
  const tokens = await complete(t, false);
  if (!tokens) throw new Error(`reference request failed: ${failures.join("; ")}`);
  alone.set(t, tokens);
}
counts.completed = 0;

const rssStart = rssMiB(server.proc.pid);
const start = await metrics(server.base);
const deadline = performance.now() + minutes * 60_000;
const running = () => performance.now() < deadline;
const healthMs: number[] = [];
let healthFailures = 0;

async function healthProbe(): Promise<void> {
  while (running()) {
    const t0 = performance.now();
    const res = await fetch(`${server.base}/health`).catch(() => null);
    healthMs.push(performance.now() - t0);
    if (res?.status !== 200) healthFailures++;
    await res?.text();
    await Bun.sleep(100);
  }
}

async function client(): Promise<void> {
  while (running()) {
    const roll = random();
    const rejectedBefore = counts.rejected;
    try {
      if (roll < 0.45) {
        const t = pick(greedyTemplates);
        const tokens = await complete(t, random() < 0.5);
        if (tokens) {
          counts.completedGreedy++;
          if (JSON.stringify(tokens) !== JSON.stringify(alone.get(t))) {
            counts.greedyMismatches++;
            if (failures.length < 20) failures.push(`greedy mismatch ${JSON.stringify(t.body)}: ${JSON.stringify(tokens)} vs alone ${JSON.stringify(alone.get(t))}`);
          }
        }
      } else if (roll < 0.75) await complete(generationBody(false), random() < 0.5);
      else if (roll < 0.87) await cancelled(generationBody(random() < 0.5));
      else await disconnected(generationBody(random() < 0.5));
    } catch (e) {
      fail(`client: ${(e as Error).message}`);
    }
    if (counts.rejected > rejectedBefore) await Bun.sleep(between(100, 400)); // refused: back off, as Retry-After asks
  }
}

async function bursts(): Promise<void> {
  const interval = Math.min(10_000, (minutes * 60_000) / 2);
  for (;;) {
    await Bun.sleep(interval);
    if (!running()) return;
    await burst();
  }
}

/** The server's RSS every 15 s: a leak shows as a steady climb. */
const rssSamples: number[] = [];
async function rssProbe(): Promise<void> {
  while (running()) {
    rssSamples.push(Number(rssMiB(server.proc.pid).toFixed(1)));
    await Bun.sleep(Math.min(15_000, Math.max(1, deadline - performance.now())));
  }
}

const progress = setInterval(() => process.stderr.write(`soak: ${JSON.stringify(counts)}\n`), 30_000);
await Promise.all([healthProbe(), bursts(), rssProbe(), ...Array.from({ length: clients }, client)]);
clearInterval(progress);

// Drained: the engine idle, every KV block back, the queue limit released.
let end = await metrics(server.base);
for (let i = 0; i < 100 && (end.num_requests_running > 0 || end.num_requests_waiting > 0 || end.kv_cache_blocks_used > 0); i++) {
  await Bun.sleep(100);
  end = await metrics(server.base);
}
const rssEnd = rssMiB(server.proc.pid);
const after = await complete({ path: "/v1/completions", body: { prompt: "ROMEO:", max_tokens: 4 } }, false);
server.proc.kill("SIGTERM");
const exitCode = await server.proc.exited;

const sorted = [...healthMs].sort((a, b) => a - b);
const quantile = (q: number) => Number((sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN).toFixed(1));
const RSS_GROWTH_LIMIT_MIB = 256;
const HEALTH_P99_LIMIT_MS = 1000;
const checks = {
  noFailedRequests: counts.failed === 0,
  greedyEqualsAlone: counts.greedyMismatches === 0 && counts.completedGreedy > 0,
  kvBlocksFreed: end.kv_cache_blocks_used === 0 && end.num_requests_running === 0 && end.num_requests_waiting === 0,
  burstsGot429: counts.burstsWith429 > 0,
  preemptedUnderLoad: end.num_preemptions_total - start.num_preemptions_total > 0,
  healthAlways200: healthFailures === 0 && healthMs.length > 0,
  healthP99UnderLimit: quantile(0.99) < HEALTH_P99_LIMIT_MS,
  rssGrowthUnderLimit: rssEnd - rssStart < RSS_GROWTH_LIMIT_MIB,
  servesAfterwards: after !== null,
  cleanExit: exitCode === 0,
};
const report = {
  ok: Object.values(checks).every(Boolean),
  checks,
  seed,
  minutes,
  clients,
  server: { maxSeqs, maxQueue, kvMemory, kvBlocksTotal: end.kv_cache_blocks_total },
  requests: counts,
  preemptions: end.num_preemptions_total - start.num_preemptions_total,
  tokensGenerated: end.generation_tokens_total - start.generation_tokens_total,
  kvBlocksUsedAtEnd: end.kv_cache_blocks_used,
  rssMiB: { start: Number(rssStart.toFixed(1)), end: Number(rssEnd.toFixed(1)), every15s: rssSamples, limitGrowth: RSS_GROWTH_LIMIT_MIB },
  healthMs: { probes: healthMs.length, p50: quantile(0.5), p99: quantile(0.99), max: Number((sorted.at(-1) ?? NaN).toFixed(1)), limitP99: HEALTH_P99_LIMIT_MS },
  failures,
  ...(counts.failed > 0 || exitCode !== 0 ? { serverStderrTail: server.stderrTail() } : {}),
};
process.stdout.write(JSON.stringify(report, null, 2) + "\n");
process.exit(report.ok ? 0 : 1);

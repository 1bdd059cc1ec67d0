// Shared by the server tests: requests against an app, SSE parsing, the KV-pool check
// every test ends with, and the target model's log-probabilities from `specinfer logits`.

import { expect } from "bun:test";
import { join } from "node:path";
import type { Hono } from "hono";
import type { ServingLLM } from "../../src/server/client";

export const ROOT = join(import.meta.dir, "..", "..");
export const TARGET_MODEL = join(ROOT, "models", "llama-shakespeare-8m");
export const SERVED = "shakespeare";

export type Json = any;

export function post(app: Hono, path: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return Promise.resolve(app.request(path, { method: "POST", headers: { "Content-Type": "application/json", ...headers }, body: JSON.stringify(body) }));
}

/** The `data:` events of an SSE body, parsed, and whether it ended with [DONE]. */
export async function readSse(res: Response): Promise<{ events: Json[]; done: boolean }> {
  expect(res.headers.get("Content-Type")).toContain("text/event-stream");
  const blocks = (await res.text()).split("\n\n").filter((b) => b.length > 0);
  const data = blocks.map((b) => {
    expect(b.startsWith("data: ")).toBe(true);
    return b.slice("data: ".length);
  });
  const done = data.at(-1) === "[DONE]";
  return { events: (done ? data.slice(0, -1) : data).map((d) => JSON.parse(d)), done };
}

/** Waits (briefly) for the engine to go idle, then checks every KV block is back. */
export async function expectPoolFull(llm: ServingLLM): Promise<void> {
  let stats = await llm.stats();
  for (let i = 0; i < 100 && (stats.kvBlocksUsed > 0 || stats.running > 0 || stats.waiting > 0); i++) {
    await Bun.sleep(20);
    stats = await llm.stats();
  }
  expect({ used: stats.kvBlocksUsed, running: stats.running, waiting: stats.waiting }).toEqual({ used: 0, running: 0, waiting: 0 });
}

/** The target model's log-softmax (in float64) of the next token after `context`,
 *  from `specinfer logits` (all logits, a separate process). */
export async function targetLogSoftmax(context: number[]): Promise<Float64Array> {
  const proc = Bun.spawn(["node_modules/.bin/bun", "src/cli.ts", "logits", "--model", TARGET_MODEL, "--tokens", context.join(","), "--top", "4096", "--json"], {
    cwd: ROOT,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`specinfer logits failed: ${err}`);
  const top: { id: number; logit: number }[] = JSON.parse(out).top;
  const logits = new Float64Array(top.length);
  for (const t of top) logits[t.id] = t.logit;
  const max = Math.max(...logits);
  const logZ = max + Math.log(logits.reduce((a, l) => a + Math.exp(l - max), 0));
  return logits.map((l) => l - logZ);
}

/** Retries `probe` until it holds or `ms` pass. */
export async function eventually(probe: () => Promise<boolean>, ms = 3000): Promise<boolean> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    if (await probe()) return true;
    await Bun.sleep(20);
  }
  return probe();
}

/** A value of a metric (with its labels, e.g. `{position="0"}`) in Prometheus text. */
export function metric(text: string, name: string): number {
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
  if (!line) throw new Error(`metric ${name} not found`);
  return Number(line.slice(line.lastIndexOf(" ") + 1));
}

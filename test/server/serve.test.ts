// `specinfer serve` as a user runs it: a separate process on a free port.

import { describe, expect, test } from "bun:test";
import { ROOT, SERVED, type Json } from "./helpers";

interface Served {
  proc: ReturnType<typeof Bun.spawn>;
  base: string;
  /** stderr up to the "listening" line. */
  stderr: string;
}

/** Starts `specinfer serve --port 0 ...` and waits for the line that names its address. */
async function serve(args: string[], env: Record<string, string> = {}): Promise<Served> {
  const proc = Bun.spawn(["node_modules/.bin/bun", "src/cli.ts", "serve", "--port", "0", ...args], {
    cwd: ROOT,
    env: { ...process.env, SPECINFER_API_KEY: "", ...env },
    stdout: "ignore",
    stderr: "pipe",
  });
  const reader = (proc.stderr as ReadableStream<Uint8Array>).getReader();
  let stderr = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`serve exited before listening: ${stderr}`);
    stderr += new TextDecoder().decode(value);
    const address = /listening on (http:\/\/[^/\s]+)/.exec(stderr)?.[1];
    if (address) {
      reader.releaseLock();
      return { proc, base: address.replace("0.0.0.0", "127.0.0.1"), stderr };
    }
  }
}

async function waitHealthy(base: string): Promise<number[]> {
  const seen: number[] = [];
  for (let i = 0; i < 600 && seen.at(-1) !== 200; i++) {
    seen.push((await fetch(`${base}/health`)).status);
    if (seen.at(-1) !== 200) await Bun.sleep(50);
  }
  return seen;
}

async function stop(s: Served): Promise<number> {
  s.proc.kill("SIGTERM");
  return s.proc.exited;
}

describe("specinfer serve", () => {
  test("listens on 127.0.0.1 at once, /health is 503 then 200 once loaded, serves under --served-model-name, exits 0 on SIGTERM", async () => {
    const s = await serve(["--served-model-name", SERVED, "--max-seqs", "4"]);
    try {
      expect(s.base).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
      const statuses = await waitHealthy(s.base);
      expect(statuses.at(-1)).toBe(200);
      expect(statuses.every((code) => code === 503 || code === 200)).toBe(true);
      const models = (await (await fetch(`${s.base}/v1/models`)).json()) as Json;
      expect(models.data[0].id).toBe(SERVED);
      const res = await fetch(`${s.base}/v1/chat/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: SERVED, messages: [{ role: "user", content: "Speak." }], max_tokens: 4, ignore_eos: true }),
      });
      expect(res.status).toBe(200);
      expect(((await res.json()) as Json).usage.completion_tokens).toBe(4);
    } finally {
      expect(await stop(s)).toBe(0);
    }
  });

  test("SPECINFER_API_KEY locks every route but /health", async () => {
    const s = await serve([], { SPECINFER_API_KEY: "k3y" });
    try {
      await waitHealthy(s.base);
      expect((await fetch(`${s.base}/v1/models`)).status).toBe(401);
      expect((await fetch(`${s.base}/v1/models`, { headers: { Authorization: "Bearer k3y" } })).status).toBe(200);
    } finally {
      await stop(s);
    }
  });

  test("--host 0.0.0.0 without an API key prints a warning", async () => {
    const s = await serve(["--host", "0.0.0.0"]);
    await stop(s);
    expect(s.stderr).toContain("warning: serving on 0.0.0.0 without --api-key");
  });

  test("bad flags exit 2 naming the flag", async () => {
    for (const [flag, value] of [["--port", "70000"], ["--max-queue", "-1"], ["--max-seqs", "zero"]]) {
      const proc = Bun.spawn(["node_modules/.bin/bun", "src/cli.ts", "serve", flag, value], { cwd: ROOT, stdout: "ignore", stderr: "pipe" });
      const [code, err] = await Promise.all([proc.exited, new Response(proc.stderr).text()]);
      expect(code).toBe(2);
      expect(err).toContain(flag);
    }
  });
});

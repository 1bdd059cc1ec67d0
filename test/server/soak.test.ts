// The soak run (scripts/soak.ts) for one minute as part of the suite: 16 clients mixing
// streamed and plain requests, sampling and greedy, speculation modes, cancellations,
// disconnects and 429 bursts against `specinfer serve` with a KV pool small enough to
// preempt. Its own checks must all hold, and the figures must show the load happened.

import { expect, test } from "bun:test";
import { ROOT } from "./helpers";

test("a one-minute soak loses no request, leaks no KV block, matches solo greedy output and keeps /health fast", async () => {
  const proc = Bun.spawn([process.execPath, "scripts/soak.ts", "--minutes", "1", "--seed", "15"], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  const report = JSON.parse(out);
  if (!report.ok) console.error(out, err);
  console.log(`soak: ${JSON.stringify({ requests: report.requests, preemptions: report.preemptions, rssMiB: report.rssMiB, healthMs: report.healthMs })}`);
  expect(report.checks).toEqual(Object.fromEntries(Object.keys(report.checks).map((k) => [k, true])));
  expect(Object.keys(report.checks).length).toBe(10);
  expect(code).toBe(0);
  // The run did what a soak must: load, greedy comparisons, cancellations, disconnects, 429s, preemption.
  const r = report.requests;
  expect(r.completed).toBeGreaterThan(100);
  expect(r.completedGreedy).toBeGreaterThan(30);
  expect(r.completedStreamed).toBeGreaterThan(30);
  expect(r.cancelled).toBeGreaterThan(0);
  expect(r.disconnected).toBeGreaterThan(0);
  expect(r.rejected).toBeGreaterThan(0);
  expect(r.failed).toBe(0);
  expect(report.preemptions).toBeGreaterThan(0);
  expect(report.kvBlocksUsedAtEnd).toBe(0);
}, 240_000);

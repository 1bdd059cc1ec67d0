// The model-file fuzzer's driver: fast-check generates mutation cases (seeded, shrunk
// on failure), each is written to disk and run by fuzz-worker.ts in a child process,
// and its outcome is judged: a load + forward, or an error naming a mutated file. A
// crash (signal or exit), a hang past the time limit or memory growth past the case's
// file size fails the property, with the seed and path that replay it.

import fc from "fast-check";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { writeSeedModels } from "./fuzz-corpus.ts";
import { caseArb, materialize, type FuzzCase, type Materialized } from "./fuzz-mutate.ts";
import type { WorkerFault, WorkerReply, WorkerRequest } from "./fuzz-worker.ts";

const WORKER = join(import.meta.dir, "fuzz-worker.ts");
export const CASE_TIME_LIMIT_MS = 5000;
/** Peak RSS growth allowed beyond the case's file bytes: the model's buffers and the
 *  JS heap's own noise (at most 5.4 MB over 20000 cases of seed 11). */
const MEMORY_SLACK_BYTES = 16 << 20;

export type RunResult = WorkerReply | { outcome: "crashed"; detail: string } | { outcome: "hung" };

/** One worker process, restarted after a crash or a hang. */
export class FuzzWorker {
  private proc: ReturnType<typeof spawnWorker> | null = null;
  private lines: AsyncIterator<string> | null = null;
  private stderr = "";

  constructor(private readonly timeLimitMs = CASE_TIME_LIMIT_MS) {}

  /** Loads and runs the model at `path` in the worker. */
  run(path: string): Promise<RunResult> {
    return this.send({ path });
  }

  /** Makes the worker crash (SIGSEGV) or spin, to show both are caught. */
  selfTest(fault: WorkerFault): Promise<RunResult> {
    return this.send({ fault });
  }

  private async send(request: WorkerRequest): Promise<RunResult> {
    if (!this.proc) await this.start();
    const proc = this.proc!;
    proc.stdin.write(JSON.stringify(request) + "\n");
    proc.stdin.flush();
    let timer: Timer | undefined;
    const timeout = new Promise<"hung">((resolve) => (timer = setTimeout(() => resolve("hung"), this.timeLimitMs)));
    const next = await Promise.race([this.lines!.next(), timeout]);
    clearTimeout(timer);
    if (next === "hung") {
      this.stop();
      return { outcome: "hung" };
    }
    if (next.done) {
      const code = await proc.exited;
      const detail = `worker died (exit ${code}${proc.signalCode ? `, signal ${proc.signalCode}` : ""}): ${this.stderr.slice(-2000)}`;
      this.proc = null;
      return { outcome: "crashed", detail };
    }
    return JSON.parse(next.value) as WorkerReply;
  }

  private async start(): Promise<void> {
    this.stderr = "";
    this.proc = spawnWorker();
    void this.collectStderr(this.proc.stderr);
    this.lines = readLines(this.proc.stdout);
    const first = await this.lines.next();
    if (first.done || first.value !== "ready") throw new Error(`fuzz worker did not start: ${this.stderr}`);
  }

  private async collectStderr(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of stream) this.stderr = (this.stderr + decoder.decode(chunk)).slice(-8000);
  }

  stop(): void {
    this.proc?.kill(9);
    this.proc = null;
  }
}

function spawnWorker() {
  return Bun.spawn([process.execPath, WORKER], { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
}

async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      yield pending.slice(0, nl);
      pending = pending.slice(nl + 1);
    }
  }
}

/** Why a case's outcome breaks the promise, or null when it keeps it. */
export function verdict(files: Materialized, r: RunResult): string | null {
  if (r.outcome === "hung") return `no answer within ${CASE_TIME_LIMIT_MS} ms`;
  if (r.outcome === "crashed") return r.detail;
  if (r.peakGrowth > files.bytes + MEMORY_SLACK_BYTES) {
    return `memory grew by ${r.peakGrowth} bytes for ${files.bytes} bytes of files`;
  }
  if (r.outcome === "loaded") return null;
  const what = `${r.errorName} in ${r.stage}: ${r.message}`;
  // A model that loaded must run; an error at load, or at encode (a vocabulary may lack
  // what the sample text needs and have no unknown token), must name a mutated file.
  if (r.stage === "forward") return `loaded, then failed: ${what}`;
  if (r.stage === "model" && r.errorName !== "ModelFormatError") return `not a ModelFormatError: ${what}`;
  if (!files.mutated.some((name) => r.message!.includes(name))) return `error does not name ${files.mutated.join(" or ")}: ${what}`;
  return null;
}

export interface FuzzStats {
  cases: number;
  loaded: number;
  refused: number;
  /** The largest peak RSS growth of a case beyond its file bytes (the slack used). */
  maxExcessGrowth: number;
  /** Refusals by their message's first words (file name first), to see what was reached. */
  reasons: Map<string, number>;
  /** With keepGoing: every failing case and why (without it the first one throws). */
  failures: { case: FuzzCase; why: string }[];
}

export interface FuzzOptions {
  seed: number;
  cases: number;
  /** Record failures and go on instead of stopping (and shrinking) at the first. */
  keepGoing?: boolean;
  /** Called after each case (progress for the CLI). */
  onCase?(done: number): void;
}

/** Runs `cases` fuzz cases; throws fast-check's report (seed, path, shrunk case) on failure. */
export async function runFuzz(opts: FuzzOptions): Promise<FuzzStats> {
  const root = mkdtempSync(join(tmpdir(), "specinfer-fuzz-"));
  const worker = new FuzzWorker();
  const stats: FuzzStats = { cases: 0, loaded: 0, refused: 0, maxExcessGrowth: 0, reasons: new Map(), failures: [] };
  try {
    const seeds = writeSeedModels(join(root, "seeds"));
    const caseDir = join(root, "case");
    await fc.assert(
      fc.asyncProperty(caseArb(), async (c: FuzzCase) => {
        const files = materialize(c, seeds, caseDir);
        const result = await worker.run(files.path);
        const why = verdict(files, result);
        const failure = why && `${seeds[c.seed % seeds.length]!.name}: ${why}`;
        if (failure && !opts.keepGoing) throw new Error(failure);
        if (failure) stats.failures.push({ case: c, why: failure });
        else count(stats, result as WorkerReply, files);
        opts.onCase?.(stats.cases);
      }),
      { seed: opts.seed, numRuns: opts.cases, includeErrorInReport: true },
    );
    return stats;
  } finally {
    worker.stop();
    rmSync(root, { recursive: true, force: true });
  }
}

function count(stats: FuzzStats, r: WorkerReply, files: Materialized): void {
  stats.cases++;
  stats.maxExcessGrowth = Math.max(stats.maxExcessGrowth, r.peakGrowth - files.bytes);
  if (r.outcome === "loaded") {
    stats.loaded++;
    return;
  }
  stats.refused++;
  const reason = r.message!.replace(/^\S*\/case\//, "").split(/[\s:(]+/).slice(0, 4).join(" ");
  stats.reasons.set(reason, (stats.reasons.get(reason) ?? 0) + 1);
}

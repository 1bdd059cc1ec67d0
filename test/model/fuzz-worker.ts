// Child process of the model-file fuzzer: reads one case per stdin line ({ path }),
// loads the model and its tokenizer, runs a forward and an encode/decode, and answers
// one JSON line per case. A native crash kills only this process; the parent sees it.
// { fault } makes it crash or spin on purpose, so the parent's detection is tested.

import { readFileSync, writeFileSync } from "node:fs";
import { createBackend } from "../../src/backend/index.ts";
import type { CausalLM } from "../../src/model/causal-lm.ts";
import { loadModel } from "../../src/model/registry.ts";
import { loadTokenizer } from "../../src/tokenizer/index.ts";
import { chainLogits } from "../helpers/forward.ts";

export type WorkerFault = "crash" | "hang";
export type WorkerRequest = { path: string } | { fault: WorkerFault };

export interface WorkerReply {
  outcome: "loaded" | "threw";
  /** What was running when it threw. */
  stage?: "model" | "forward" | "tokenizer" | "encode";
  errorName?: string;
  message?: string;
  /** Peak resident memory during the case, above the resident size before it. */
  peakGrowth: number;
}

const backend = await createBackend({ kind: "cpu", threads: 1 });

const rss = () => process.memoryUsage().rss;
/** Peak RSS since the last resetPeak (Linux's VmHWM). */
const peakRss = () => Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"))![1]) * 1024;
const resetPeak = () => writeFileSync("/proc/self/clear_refs", "5");

function runCase(path: string): WorkerReply {
  let stage: WorkerReply["stage"] = "model";
  let model: CausalLM | undefined;
  const before = rss();
  resetPeak();
  const reply = (r: Omit<WorkerReply, "peakGrowth">): WorkerReply => ({ ...r, peakGrowth: Math.max(0, peakRss() - before) });
  try {
    model = loadModel(path, backend, { maxBatchTokens: 16 });
    stage = "forward";
    const vocab = model.config.vocabSize;
    chainLogits(model, [1, 5, 9].map((t) => t % vocab));
    stage = "tokenizer";
    const tokenizer = loadTokenizer({ path, ggufMetadata: model.files.gguf?.metadata });
    stage = "encode";
    tokenizer.decode(tokenizer.encode("the hello world"));
    return reply({ outcome: "loaded" });
  } catch (e) {
    const error = e instanceof Error ? e : new Error(`non-Error thrown: ${String(e)}`);
    return reply({ outcome: "threw", stage, errorName: error.name, message: error.message.slice(0, 2000) });
  } finally {
    model?.close();
  }
}

console.write("ready\n");
for await (const line of console) {
  const request = JSON.parse(line) as WorkerRequest;
  if ("fault" in request) {
    if (request.fault === "crash") process.kill(process.pid, "SIGSEGV");
    for (;;); // "hang"
  }
  console.write(JSON.stringify(runCase(request.path)) + "\n");
}

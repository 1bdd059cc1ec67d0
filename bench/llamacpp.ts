// The llama.cpp side of the CPU benchmark, through node-llama-cpp (pinned), installed on
// first use into bench/.llama/ (git-ignored) so that a plain `npm install` of the project
// never pulls it. Its prebuilt Linux x64 CPU binaries ship as optional dependencies
// (@node-llama-cpp/linux-x64) and load without its postinstall script, which npm 11
// leaves unapproved (the warning it prints is harmless here). It runs inside Bun.
//
// Everything here goes through node-llama-cpp's public API: a context sequence per
// model, evaluateWithoutGeneratingNewTokens (prefill), evaluate (greedy decode, one
// token per step), controlledEvaluate (a batch of L tokens that each get a sampled
// next token, i.e. verification; or full next-token probabilities for the gate) and
// DraftSequenceTokenPredictor (its speculative decoding).

import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

export const NODE_LLAMA_CPP_VERSION = "3.21.1";
export const LLAMA_PREFIX = join(import.meta.dir, ".llama");
const ENTRY = join(LLAMA_PREFIX, "node_modules", "node-llama-cpp", "dist", "index.js");

// The package (and its types) live in the ignored prefix, out of tsc's reach.
type Token = number;
type Any = any;

/** Installs node-llama-cpp@3.21.1 under bench/.llama on first use and imports it. */
export async function importNodeLlamaCpp(log: (m: string) => void): Promise<Any> {
  const pkg = join(LLAMA_PREFIX, "node_modules", "node-llama-cpp", "package.json");
  const installed = existsSync(pkg) ? (JSON.parse(readFileSync(pkg, "utf8")) as { version: string }).version : null;
  if (installed !== NODE_LLAMA_CPP_VERSION) {
    log(`installing node-llama-cpp@${NODE_LLAMA_CPP_VERSION} into ${LLAMA_PREFIX} (one time, ~30 s)`);
    mkdirSync(LLAMA_PREFIX, { recursive: true });
    // --prefix keeps it out of the project's package.json and lockfile; -E pins it.
    const r = spawnSync("npm", ["install", "--prefix", LLAMA_PREFIX, "-E", "--no-audit", "--no-fund", `node-llama-cpp@${NODE_LLAMA_CPP_VERSION}`], {
      stdio: ["ignore", "inherit", "inherit"],
    });
    if (r.status !== 0) throw new Error(`npm install of node-llama-cpp failed (exit ${r.status}); see the output above`);
  }
  return import(ENTRY);
}

export interface LlamaCppOptions {
  threads: number;
  contextSize: number;
  batchSize: number;
}

/** One llama.cpp runtime (getLlama), CPU only, prebuilt binaries only. */
export class LlamaCpp {
  private constructor(readonly lib: Any, readonly llama: Any) {}

  static async create(maxThreads: number, log: (m: string) => void): Promise<LlamaCpp> {
    const lib = await importNodeLlamaCpp(log);
    const llama = await lib.getLlama({
      gpu: false,
      build: "never",
      usePrebuiltBinaries: true,
      progressLogs: false,
      logLevel: lib.LlamaLogLevel.error,
      maxThreads,
    });
    return new LlamaCpp(lib, llama);
  }

  get systemInfo(): string {
    return String(this.llama.systemInfo).trim();
  }

  async load(path: string): Promise<Any> {
    return this.llama.loadModel({ modelPath: path, gpuLayers: 0 });
  }

  /** A context with one sequence that uses `threads` threads. The runtime's maxThreads
   *  caps all contexts together, so a target and its draft share them (a `min` here
   *  would deadlock a target waiting for its draft's tokens). */
  async session(model: Any, opts: LlamaCppOptions, tokenPredictor?: Any): Promise<LlamaCppSession> {
    const context = await model.createContext({
      contextSize: opts.contextSize,
      batchSize: opts.batchSize,
      sequences: 1,
      threads: opts.threads,
    });
    return new LlamaCppSession(context, context.getSequence(tokenPredictor ? { tokenPredictor } : undefined));
  }

  async close(): Promise<void> {
    await this.llama.dispose();
  }
}

const FULL_DISTRIBUTION = { temperature: 1, topK: 0, topP: 1, minP: 0 };

export class LlamaCppSession {
  constructor(readonly context: Any, readonly seq: Any) {}

  async reset(): Promise<void> {
    await this.seq.clearHistory();
  }

  /** Next-token log-probabilities after every prefix of `tokens` (from a fresh state). */
  async logProbs(tokens: number[], vocab: number): Promise<Float64Array[]> {
    await this.reset();
    const input = tokens.map((t) => [t, { generateNext: { probabilities: true, options: FULL_DISTRIBUTION } }]);
    const out = await this.seq.controlledEvaluate(input);
    await this.reset();
    return tokens.map((_, i) => {
      const probs: Map<Token, number> = out[i].next.probabilities;
      const row = new Float64Array(vocab).fill(-Infinity);
      for (const [tok, p] of probs) row[tok] = Math.log(p);
      return row;
    });
  }

  /** Milliseconds to evaluate `tokens` from an empty state (no sampling). */
  async prefill(tokens: number[]): Promise<number> {
    await this.reset();
    const t = performance.now();
    await this.seq.evaluateWithoutGeneratingNewTokens(tokens);
    return performance.now() - t;
  }

  /** After a prefill: `steps` greedy decode steps, one token each. Milliseconds. */
  async decode(first: number, steps: number): Promise<{ ms: number; tokens: number[] }> {
    const tokens: number[] = [];
    const t = performance.now();
    for await (const tok of this.seq.evaluate([first], { temperature: 0, yieldEogToken: true })) {
      tokens.push(tok);
      if (tokens.length >= steps) break;
    }
    return { ms: performance.now() - t, tokens };
  }

  /** After a prefill of `prefix` tokens: one batch of `tokens` that each get a greedy
   *  next token (what a verifier needs), then the batch is erased again. Milliseconds. */
  async verify(tokens: number[]): Promise<number> {
    const start = this.seq.nextTokenIndex;
    const input = tokens.map((t) => [t, { generateNext: { token: true, options: { temperature: 0 } } }]);
    const t = performance.now();
    await this.seq.controlledEvaluate(input);
    const ms = performance.now() - t;
    await this.seq.eraseContextTokenRanges([{ start, end: start + tokens.length }]);
    return ms;
  }

  /** Greedy generation of `n` tokens after `prompt`, the way node-llama-cpp users run it
   *  (with the sequence's token predictor, if any). Decode time excludes the prompt. */
  async generate(prompt: number[], n: number): Promise<{ tokens: number[]; decodeMs: number }> {
    await this.reset();
    const tokens: number[] = [];
    let t0 = 0;
    for await (const tok of this.seq.evaluate(prompt, { temperature: 0, yieldEogToken: true })) {
      if (tokens.length === 0) t0 = performance.now();
      tokens.push(tok);
      if (tokens.length >= n) break;
    }
    return { tokens, decodeMs: performance.now() - t0 };
  }

  get predictions(): { used: number; unused: number; validated: number; refuted: number } {
    return this.seq.tokenPredictions;
  }

  async dispose(): Promise<void> {
    await this.context.dispose();
  }
}

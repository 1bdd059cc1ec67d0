// The scripting API: a thin typed proxy over the engine, which runs in a Bun Worker
// (no native call on the caller's thread after loading). Names follow SpecInfer's
// flexflow.serve: LLM, SSM, compile({ ssms, maxRequestsPerBatch, maxSeqLength,
// maxTokensPerBatch, tree, ngram }).

import { existsSync } from "node:fs";
import type { GenerationConfig } from "../engine/config";
import { EngineClient } from "../runtime/client";
import type { EngineEvent, EngineStats } from "../engine/core";
import type { FinishReason, TokenLogprob } from "../engine/request";
import type { StatsSummary } from "../engine/stats";
import type { BatchLimits, EngineInfo, RuntimeOptions } from "../runtime/load";
import { DEFAULT_MODEL } from "../runtime/paths";
import { encodeChat, loadTokenizer, type ChatMessage, type Tokenizer } from "../tokenizer/index";

export interface LoadOptions extends Omit<RuntimeOptions, "model"> {
  /** Run the engine in a Bun Worker (default) or on this thread (tests, tools). */
  worker?: boolean;
  /** Called as loading proceeds (0..1). */
  onProgress?(fraction: number, what: string): void;
}

export interface GenerateOptions extends Partial<GenerationConfig> {
  /** Aborting cancels the request at once and frees its KV blocks; the result then
   *  has finishReason "cancelled". */
  signal?: AbortSignal;
}

export interface GenerationResult {
  text: string;
  tokens: number[];
  /** Per token: proposed by a drafter and accepted by the LLM. */
  fromDraft: boolean[];
  /** Per token, when `logprobs` was asked for: the target model's log-probabilities. */
  logprobs?: TokenLogprob[];
  finishReason: Exclude<FinishReason, "error">;
  promptTokens: number;
  stats: StatsSummary;
}

export interface StreamPiece {
  text: string;
  tokens: number[];
  fromDraft: boolean[];
  logprobs?: TokenLogprob[];
}

export interface CompileOptions extends BatchLimits {
  /** Draft models (SpecInfer's SSMs): SSM handles or paths. */
  ssms?: (SSM | string)[];
  /** Shape of requests asking for a fixed tree: "1,1,3,1,1" or "dynamic:32". */
  tree?: string | number[];
  /** Prompt-lookup drafting (no model). */
  ngram?: boolean;
}

/** A small model that drafts token trees for an LLM (SpecInfer's SSM). It is loaded
 *  where the engine runs when an LLM compiles with it.
 *  @example
 *  const llm = await LLM.load("path/to/llama");
 *  await llm.compile({ ssms: [new SSM("path/to/draft")], tree: "1,1,3,1,1" });
 */
export class SSM {
  constructor(readonly path: string) {
    if (!existsSync(path)) throw new Error(`no such file or directory: ${path}`);
  }
}

/** A loaded LLM serving generations; requests made while others run share forward
 *  passes (continuous batching), each speculating as it asks.
 *  @example
 *  const llm = await LLM.load();                    // the embedded pair, speculating
 *  const out = await llm.generate("ROMEO:\n", { maxNewTokens: 48 });
 *  console.log(out.text, out.stats.meanAcceptedLength);
 *  await llm.close();
 */
export class LLM {
  private constructor(
    private readonly client: EngineClient,
    /** The model's tokenizer, on the caller's thread (pure JS). */
    readonly tokenizer: Tokenizer,
  ) {}

  /** Loads a model directory or GGUF file (default: the embedded pair, with its draft
   *  model speculating).
   *  @example
   *  const llm = await LLM.load("model.gguf", { ssms: ["draft.gguf"], maxRequestsPerBatch: 16 });
   */
  static async load(path?: string, opts: LoadOptions = {}): Promise<LLM> {
    const model = path ?? DEFAULT_MODEL;
    if (!existsSync(model)) throw new Error(`no such file or directory: ${model}`);
    const { worker, onProgress, ...runtime } = opts;
    const tokenizer = loadTokenizer({ path: model });
    const client = await EngineClient.start({ ...runtime, model: path }, { worker: worker ?? true, onProgress });
    return new LLM(client, tokenizer);
  }

  /** Model, limits and speculation setup of the engine. */
  get info(): EngineInfo {
    return this.client.info;
  }

  /** The model's own sampling defaults (generation_config.json), under every call's options. */
  get defaults(): Partial<GenerationConfig> {
    return this.client.defaults;
  }

  /** Sets the drafters, tree shape (no SSMs and no n-gram: plain decoding) and batch
   *  limits (a limit left out keeps its value); only while no request runs. A refused
   *  setting changes nothing.
   *  @example
   *  await llm.compile({ ssms: [new SSM("draft")], tree: "dynamic:16", ngram: true, maxRequestsPerBatch: 16, maxTokensPerBatch: 256 });
   */
  async compile(opts: CompileOptions): Promise<EngineInfo> {
    const ssms = (opts.ssms ?? []).map((s) => (typeof s === "string" ? new SSM(s).path : s.path));
    const tree = Array.isArray(opts.tree) ? opts.tree.join(",") : opts.tree;
    const { maxRequestsPerBatch, maxTokensPerBatch, maxSeqLength } = opts;
    return this.client.compile({ ssms, tree, ngram: opts.ngram ?? false, maxRequestsPerBatch, maxTokensPerBatch, maxSeqLength });
  }

  /** Generates a completion of `prompt` (text or token ids); for a list of prompts, all
   *  run together and the results come back in order.
   *  @example
   *  const [a, b] = await llm.generate(["ROMEO:", "JULIET:"], { maxNewTokens: 16, temperature: 0 });
   */
  generate(prompt: string | number[], opts?: GenerateOptions): Promise<GenerationResult>;
  generate(prompts: (string | number[])[], opts?: GenerateOptions): Promise<GenerationResult[]>;
  generate(prompt: string | number[] | (string | number[])[], opts: GenerateOptions = {}): Promise<GenerationResult | GenerationResult[]> {
    if (Array.isArray(prompt) && prompt.some((p) => typeof p !== "number")) {
      return Promise.all((prompt as (string | number[])[]).map((p) => this.generate(p, opts)));
    }
    return new Promise((resolve, reject) => {
      const pieces: StreamPiece[] = [];
      this.start(prompt as string | number[], opts, {
        piece: (p) => pieces.push(p),
        done: (finish) => resolve(result(pieces, finish)),
        fail: reject,
      });
    });
  }

  /** Streams a completion piece by piece; leaving the loop early cancels the request.
   *  The generator's return value is the whole result.
   *  @example
   *  for await (const piece of llm.stream("JULIET:\n", { temperature: 0.8, seed: 1 })) process.stdout.write(piece.text);
   */
  async *stream(prompt: string | number[], opts: GenerateOptions = {}): AsyncGenerator<StreamPiece, GenerationResult> {
    const queue: StreamPiece[] = [];
    const all: StreamPiece[] = [];
    let finished: Extract<EngineEvent, { type: "finish" }> | null = null;
    let failed: Error | null = null;
    let wake: (() => void) | null = null;
    const id = this.start(prompt, opts, {
      piece: (p) => {
        queue.push(p);
        all.push(p);
        wake?.();
      },
      done: (f) => {
        finished = f;
        wake?.();
      },
      fail: (e) => {
        failed = e;
        wake?.();
      },
    });
    try {
      for (;;) {
        if (queue.length > 0) {
          yield queue.shift()!;
          continue;
        }
        if (failed) throw failed;
        if (finished) return result(all, finished);
        await new Promise<void>((r) => (wake = r));
        wake = null;
      }
    } finally {
      if (!finished && !failed) this.client.cancel(id);
    }
  }

  /** Renders `messages` with the model's chat template and generates the reply.
   *  @example
   *  const reply = await llm.chat([{ role: "user", content: "Who art thou?" }]);
   */
  chat(messages: ChatMessage[], opts: GenerateOptions = {}): Promise<GenerationResult> {
    return this.generate(this.chatPrompt(messages), opts);
  }

  /** Token ids of `messages` rendered with the model's chat template (or the plain
   *  fallback), ready for the assistant's reply. */
  chatPrompt(messages: ChatMessage[]): number[] {
    return encodeChat(this.tokenizer, messages, { addGenerationPrompt: true });
  }

  /** Engine counters: queues, KV blocks, preemptions, tokens, speculation. */
  stats(): Promise<EngineStats> {
    return this.client.stats();
  }

  /** Test hook: the engine's next step throws with `message`. */
  injectFault(message: string): void {
    this.client.injectFault(message);
  }

  /** Stops the engine; requests in flight reject with EngineClosedError. */
  close(): Promise<void> {
    return this.client.close();
  }

  private start(
    prompt: string | number[],
    opts: GenerateOptions,
    on: { piece(p: StreamPiece): void; done(f: Extract<EngineEvent, { type: "finish" }>): void; fail(e: Error): void },
  ): number {
    const { signal, ...config } = opts;
    const ids = typeof prompt === "string" ? this.tokenizer.encode(prompt) : prompt;
    const id = this.client.submit(ids, config, {
      onEvent: (e) => {
        if (e.type === "tokens") on.piece({ text: e.text, tokens: e.tokens, fromDraft: e.fromDraft, ...(e.logprobs ? { logprobs: e.logprobs } : {}) });
        else if (e.reason === "error") on.fail(new Error(e.error ?? "the engine failed this request"));
        else {
          if (e.text) on.piece({ text: e.text, tokens: [], fromDraft: [] });
          on.done(e);
        }
        if (e.type === "finish") signal?.removeEventListener("abort", abort);
      },
      onError: (e) => {
        signal?.removeEventListener("abort", abort);
        on.fail(e);
      },
    });
    const abort = () => this.client.cancel(id);
    if (signal?.aborted) abort();
    else signal?.addEventListener("abort", abort, { once: true });
    return id;
  }
}

function result(pieces: StreamPiece[], finish: Extract<EngineEvent, { type: "finish" }>): GenerationResult {
  const logprobs = pieces.some((p) => p.logprobs) ? pieces.flatMap((p) => p.logprobs ?? []) : undefined;
  return {
    text: pieces.map((p) => p.text).join(""),
    tokens: pieces.flatMap((p) => p.tokens),
    fromDraft: pieces.flatMap((p) => p.fromDraft),
    ...(logprobs ? { logprobs } : {}),
    finishReason: finish.reason as GenerationResult["finishReason"],
    promptTokens: finish.promptTokens,
    stats: finish.stats,
  };
}

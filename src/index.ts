// The scripting API:
//
//   const llm = await LLM.load();                       // the embedded default pair
//   const out = await llm.generate("ROMEO:", { maxNewTokens: 32 });
//   for await (const piece of llm.stream("JULIET:")) process.stdout.write(piece.text);
//   llm.close();
//
// Requests submitted while others run share their forward passes (continuous batching).

import { existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Backend } from "./backend/backend";
import { createBackend, type BackendKind } from "./backend/index";
import { definedOnly, generationDefaults, type GenerationConfig } from "./engine/config";
import { Engine, type FinishReason, type Request, type TokenEvent } from "./engine/engine";
import type { StatsSummary } from "./engine/stats";
import { TextStream } from "./engine/text";
import { loadLlama, type LlamaModel } from "./model/llama";
import { createSpeculator, type SpeculationOptions } from "./speculation/speculator";
import { encodeChat, loadTokenizer, type ChatMessage, type Tokenizer } from "./tokenizer/index";

export type { GenerationConfig } from "./engine/config";
export type { ChatMessage } from "./tokenizer/index";
export type { StatsSummary } from "./engine/stats";

/** The vendored trained pair (models/MODEL_CARD.md). */
export const DEFAULT_MODEL = join(import.meta.dir, "..", "models", "llama-shakespeare-8m");
export const DEFAULT_DRAFT = join(import.meta.dir, "..", "models", "llama-shakespeare-1.4m-draft");

export interface LoadOptions {
  backend?: BackendKind;
  threads?: number;
  /** Most tokens per forward pass. */
  maxBatchTokens?: number;
  /** Most requests decoded together. */
  maxSeqs?: number;
  /** Called as loading proceeds (0..1). */
  onProgress?(fraction: number, what: string): void;
}

export type GenerateOptions = Partial<GenerationConfig>;

export interface GenerationResult {
  text: string;
  tokens: number[];
  /** Per token: proposed by a drafter and accepted by the LLM. */
  fromDraft: boolean[];
  finishReason: FinishReason;
  stats: StatsSummary;
}

export interface StreamPiece {
  text: string;
  tokens: number[];
  fromDraft: boolean[];
}

/** A small model that drafts token trees for an LLM (SpecInfer's SSM). Loaded with
 *  `{ llm }` it shares the LLM's backend and is closed with it. */
export class SSM {
  private closed = false;

  private constructor(readonly model: LlamaModel, private readonly ownBackend: Backend | null) {}

  static async load(path: string, opts: { threads?: number; backend?: BackendKind; llm?: LLM } = {}): Promise<SSM> {
    const shared = opts.llm?.backend;
    const backend = shared ?? (await createBackend({ kind: opts.backend, threads: opts.threads }));
    const ssm = new SSM(loadLlama(path, backend, { maxBatchTokens: 512 }), shared ? null : backend);
    opts.llm?.attach(ssm);
    return ssm;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.model.close();
    this.ownBackend?.close();
  }
}

export interface CompileOptions {
  ssms?: SSM[];
  /** Static widths per depth ("1,1,3,1,1" or [1,1,3,1,1]) or "dynamic:N" (node budget). */
  tree?: string | number[];
  /** Prompt-lookup drafting (no model). */
  ngram?: boolean;
}

export class LLM {
  private readonly engine: Engine;
  private pumping = false;
  private readonly inFlight = new Map<Request, { resolve: () => void; reject: (e: unknown) => void }>();
  private readonly attached: SSM[] = [];

  /** The model's own sampling defaults (generation_config.json), under every call's options. */
  readonly defaults: GenerateOptions;

  private constructor(
    readonly backend: Backend,
    readonly model: LlamaModel,
    readonly tokenizer: Tokenizer,
    opts: LoadOptions,
  ) {
    this.defaults = readGenerationDefaults(model.files.path);
    this.engine = new Engine(model, { maxSeqs: opts.maxSeqs, maxBatchTokens: opts.maxBatchTokens, eosTokenIds: tokenizer.eosIds });
  }

  /** Loads a model directory or GGUF file; with no path, the embedded default pair
   *  with speculation on. */
  static async load(path?: string, opts: LoadOptions = {}): Promise<LLM> {
    const target = path ?? DEFAULT_MODEL;
    if (!existsSync(target)) throw new Error(`no such file or directory: ${target}`);
    opts.onProgress?.(0, "backend");
    const backend = await createBackend({ kind: opts.backend, threads: opts.threads });
    opts.onProgress?.(0.1, "weights");
    const model = loadLlama(target, backend, { maxBatchTokens: opts.maxBatchTokens, onProgress: (f) => opts.onProgress?.(0.1 + 0.7 * f, "weights") });
    opts.onProgress?.(0.8, "tokenizer");
    const tokenizer = loadTokenizer({ path: target, ggufMetadata: model.files.gguf?.metadata });
    const llm = new LLM(backend, model, tokenizer, opts);
    if (!path) {
      opts.onProgress?.(0.9, "draft model");
      llm.compile({ ssms: [await SSM.load(DEFAULT_DRAFT, { llm })] });
    }
    opts.onProgress?.(1, "ready");
    return llm;
  }

  /** Turns speculation on (drafters + tree shape) or off (`null`). */
  compile(opts: CompileOptions | null): this {
    this.engine.speculator = opts && ((opts.ssms?.length ?? 0) > 0 || opts.ngram)
      ? createSpeculator(this.model, this.engine.maxSeqs, {
          ssms: (opts.ssms ?? []).map((s) => s.model),
          tree: opts.tree,
          ngram: opts.ngram ?? false,
        } satisfies SpeculationOptions)
      : null;
    return this;
  }

  /** Statistics aggregated over every request this LLM has finished. */
  stats(): StatsSummary {
    return this.engine.stats();
  }

  get speculating(): boolean {
    return this.engine.speculator !== null;
  }

  async generate(prompt: string | number[], opts: GenerateOptions = {}): Promise<GenerationResult> {
    const pieces: StreamPiece[] = [];
    const run = this.start(prompt, opts, (p) => pieces.push(p));
    await run.finished;
    return run.result(pieces);
  }

  async *stream(prompt: string | number[], opts: GenerateOptions = {}): AsyncGenerator<StreamPiece, GenerationResult> {
    const queue: StreamPiece[] = [];
    let wake: (() => void) | null = null;
    const all: StreamPiece[] = [];
    const run = this.start(prompt, opts, (p) => {
      queue.push(p);
      all.push(p);
      wake?.();
    });
    let over = false;
    run.finished.then(() => {
      over = true;
      wake?.();
    });
    try {
      while (true) {
        if (queue.length > 0) {
          yield queue.shift()!;
          continue;
        }
        if (over) break;
        await new Promise<void>((r) => (wake = r));
        wake = null;
      }
      return run.result(all);
    } finally {
      this.engine.cancel(run.request);
    }
  }

  /** Renders `messages` with the model's chat template and generates the reply. */
  async chat(messages: ChatMessage[], opts: GenerateOptions = {}): Promise<GenerationResult> {
    return this.generate(this.chatPrompt(messages), opts);
  }

  /** Token ids of `messages` rendered with the model's chat template (or the plain
   *  fallback), ready for the assistant's reply. */
  chatPrompt(messages: ChatMessage[]): number[] {
    return encodeChat(this.tokenizer, messages, { addGenerationPrompt: true });
  }

  /** SSMs loaded with `{ llm: this }` close with it. */
  attach(ssm: SSM): void {
    this.attached.push(ssm);
  }

  close(): void {
    this.engine.close();
    for (const s of this.attached) s.close();
    this.model.close();
    this.backend.close();
  }

  private start(prompt: string | number[], opts: GenerateOptions, onPiece: (p: StreamPiece) => void) {
    const ids = typeof prompt === "string" ? this.tokenizer.encode(prompt) : prompt;
    const text = new TextStream(this.tokenizer, ids, opts.stop ?? []);
    let settle!: { resolve: () => void; reject: (e: unknown) => void };
    const finished = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    const request: Request = this.engine.submit(ids, { ...this.defaults, ...definedOnly(opts) }, {
      onTokens: (events: TokenEvent[]) => {
        const update = text.push(events.map((e) => e.token));
        const kept = events.slice(0, update.keepTokens ?? events.length);
        onPiece({ text: update.text, tokens: kept.map((e) => e.token), fromDraft: kept.map((e) => e.fromDraft) });
        return update.keepTokens;
      },
      onFinish: () => {
        const rest = text.finish();
        if (rest) onPiece({ text: rest, tokens: [], fromDraft: [] });
        this.inFlight.delete(request);
        settle.resolve();
      },
    });
    if (request.done) settle.resolve();
    else this.inFlight.set(request, settle);
    void this.pump();
    return {
      request,
      finished,
      result: (pieces: StreamPiece[]): GenerationResult => ({
        text: pieces.map((p) => p.text).join(""),
        tokens: [...request.generated],
        fromDraft: [...request.fromDraft],
        finishReason: request.finishReason ?? "cancelled",
        stats: request.stats.summary(request.generated.length),
      }),
    };
  }

  /** Steps the engine while requests run, yielding to the event loop between steps
   *  so that new requests join the batch and consumers see tokens as they come. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.engine.idle) {
        this.engine.step();
        await new Promise((r) => setImmediate(r));
      }
    } catch (e) {
      // A failed step fails every request in flight; the LLM stays usable.
      for (const [req, settle] of this.inFlight) {
        this.inFlight.delete(req);
        settle.reject(e);
        this.engine.cancel(req);
      }
    } finally {
      this.pumping = false;
    }
  }
}

function readGenerationDefaults(modelPath: string): GenerateOptions {
  const file = statSync(modelPath).isDirectory() ? join(modelPath, "generation_config.json") : "";
  if (!file || !existsSync(file)) return {};
  try {
    return generationDefaults(JSON.parse(readFileSync(file, "utf8")));
  } catch {
    return {}; // a broken optional file must not stop the model from loading
  }
}

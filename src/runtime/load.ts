// The one composition root: plain, serialisable options -> backend, models, tokenizer,
// sampling defaults, KV cache, drafters, cost model and engine. The scripting API (in
// its Worker or in-thread), every CLI command, the server and the benchmarks use it.

import { existsSync, readFileSync, statSync } from "node:fs";
import { freemem } from "node:os";
import { join } from "node:path";
import { DeviceGroup } from "../backend/group";
import type { BackendKind } from "../backend/index";
import { definedOnly, generationDefaults, type GenerationConfig } from "../engine/config";
import { CostCurve, CostModel, measurementGrid } from "../engine/cost";
import { createEngine, type Engine } from "../engine/core";
import { DType } from "../backend/backend";
import { kvBytesPerToken } from "../kv/cache";
import { SequenceRunner } from "../kv/sequence";
import type { CausalLM } from "../model/causal-lm";
import { loadModel } from "../model/registry";
import { AUTO_MAX_DEPTH, createSpeculator } from "../speculation/speculator";
import { loadTokenizer, type Tokenizer } from "../tokenizer/index";
import { DEFAULT_DRAFT, DEFAULT_MODEL } from "./paths";

export type KVDTypeName = "f32" | "f16";

function kvDType(name: KVDTypeName | undefined): DType.F32 | DType.F16 {
  if (name === undefined || name === "f16") return DType.F16;
  if (name === "f32") return DType.F32;
  throw new Error(`kvDtype must be "f32" or "f16", got ${JSON.stringify(name)}`);
}

export interface SpeculationSetup {
  /** Draft model paths (SpecInfer's SSMs). Default: the embedded draft when the model
   *  is the embedded one, else none. */
  ssms?: string[];
  /** Tree shape of requests asking for a fixed tree ("1,1,3,1,1", "dynamic:32"). */
  tree?: string;
  /** Prompt-lookup drafting. */
  ngram?: boolean;
}

/** SpecInfer's batch limits (flexflow.serve's names). */
export interface BatchLimits {
  /** Most requests running at once (SpecInfer's max_requests_per_batch). Default 8. */
  maxRequestsPerBatch?: number;
  /** Most tokens per forward pass (SpecInfer's max_tokens_per_batch). Default 512. */
  maxTokensPerBatch?: number;
  /** Longest prompt + generation (SpecInfer's max_seq_length). Default the model's context. */
  maxSeqLength?: number;
}

/** What `compile` may change: the speculation setup and the batch limits. */
export type CompileSetup = SpeculationSetup & BatchLimits;

export interface RuntimeOptions extends SpeculationSetup, BatchLimits {
  /** HF directory or .gguf file; default the embedded model. */
  model?: string;
  backend?: BackendKind;
  threads?: number;
  /** Bytes for the LLM's KV cache. Default: what maxRequestsPerBatch full sequences
   *  need, at most a quarter of free memory. */
  kvMemory?: number;
  /** KV cache element type. Default f16, as llama.cpp. */
  kvDtype?: KVDTypeName;
  /** Measure forward costs at load for "auto" speculation (default true). */
  measure?: boolean;
  /** Devices the LLM is split over, Megatron style (default 1). On the CPU each device
   *  is a backend context with `threads` threads of its own. */
  tensorParallel?: number;
  /** Device of the group the SSMs draft on (default 0, the LLM's first): on the CPU a
   *  context with its own threads, on CUDA a context with its own stream. */
  ssmDevice?: number;
}

export interface EngineInfo {
  model: string;
  contextLength: number;
  vocabSize: number;
  eosTokenIds: number[];
  speculating: boolean;
  ssms: string[];
  tree: string | null;
  ngram: boolean;
  kvBlocks: number;
  kvBlockSize: number;
  kvDtype: KVDTypeName;
  maxRequestsPerBatch: number;
  maxTokensPerBatch: number;
}

export type Progress = (fraction: number, what: string) => void;

export class Runtime {
  engine: Engine;
  private readonly drafts = new Map<string, CausalLM>();
  private setup: SpeculationSetup = {};
  private kvBytes: number;

  private constructor(
    private options: RuntimeOptions,
    readonly modelPath: string,
    /** The devices: the LLM on the first tensorParallel, the SSMs on ssmDevice. */
    readonly group: DeviceGroup,
    /** Replaced when compile changes maxTokensPerBatch (its buffers are sized by it). */
    private llm: CausalLM,
    readonly tokenizer: Tokenizer,
    readonly defaults: Partial<GenerationConfig>,
  ) {
    this.kvBytes = kvBudget(llm, options);
    this.engine = this.createEngine();
  }

  static async load(options: RuntimeOptions, progress: Progress = () => {}): Promise<Runtime> {
    const modelPath = options.model ?? DEFAULT_MODEL;
    if (!existsSync(modelPath)) throw new Error(`no such file or directory: ${modelPath}`);
    progress(0, "backend");
    const tensorParallel = options.tensorParallel ?? 1;
    const ssmDevice = options.ssmDevice ?? 0;
    if (!Number.isInteger(ssmDevice) || ssmDevice < 0) throw new Error(`ssmDevice must be a non-negative integer, got ${ssmDevice}`);
    const group = await DeviceGroup.create({ kind: options.backend, threads: options.threads, tensorParallel, devices: Math.max(tensorParallel, ssmDevice + 1) });
    try {
      progress(0.05, "weights");
      checkLimits(options);
      const llm = loadModel(modelPath, group, {
        maxBatchTokens: options.maxTokensPerBatch ?? 512,
        onProgress: (f) => progress(0.05 + 0.6 * f, "weights"),
      });
      progress(0.65, "tokenizer");
      const tokenizer = loadTokenizer({ path: modelPath, ggufMetadata: llm.files.gguf?.metadata });
      const defaults = readGenerationDefaults(modelPath);
      const runtime = new Runtime(options, modelPath, group, llm, tokenizer, defaults);
      progress(0.7, "draft models");
      const ssms = options.ssms ?? (options.model === undefined ? [DEFAULT_DRAFT] : []);
      runtime.compile({ ssms, tree: options.tree, ngram: options.ngram }, (f) => progress(0.7 + 0.3 * f, "measuring forward costs"));
      progress(1, "ready");
      return runtime;
    } catch (e) {
      group.close();
      throw e;
    }
  }

  get info(): EngineInfo {
    const c = this.llm.config;
    const s = this.engine.speculator;
    return {
      model: this.modelPath,
      contextLength: this.engine.contextLength,
      vocabSize: c.vocabSize,
      eosTokenIds: this.tokenizer.eosIds,
      speculating: s !== null,
      ssms: this.setup.ssms ?? [],
      tree: s && s.hasModels ? (this.setup.tree ?? null) : null,
      ngram: this.setup.ngram ?? false,
      kvBlocks: this.engine.kv.totalBlocks,
      kvBlockSize: this.engine.kv.blockSize,
      kvDtype: this.options.kvDtype ?? "f16",
      maxRequestsPerBatch: this.options.maxRequestsPerBatch ?? 8,
      maxTokensPerBatch: this.llm.maxBatchTokens,
    };
  }

  /** Sets the drafters (loaded once per path), tree and batch limits; only while no
   *  request runs. No SSMs and no n-gram: plain decoding. A limit left out keeps its
   *  value. Nothing changes when a setting is refused. */
  compile(setup: CompileSetup, progress: (fraction: number) => void = () => {}): void {
    if (!this.engine.idle) throw new Error("compile: only while no request runs");
    checkLimits(setup);
    for (const p of setup.ssms ?? []) {
      if (!this.drafts.has(p)) {
        if (!existsSync(p)) throw new Error(`no such file or directory: ${p}`);
        this.drafts.set(p, loadModel(p, this.group.devices[this.options.ssmDevice ?? 0]!, { maxBatchTokens: 512 }));
      }
    }
    const { maxRequestsPerBatch, maxTokensPerBatch, maxSeqLength } = setup;
    const options: RuntimeOptions = { ...this.options, ...definedOnly({ maxRequestsPerBatch, maxTokensPerBatch, maxSeqLength }) };
    // The forward's buffers are sized by maxTokensPerBatch: a new value loads the model
    // again (a mapping; on CUDA an upload) before the old one goes.
    const llm = (options.maxTokensPerBatch ?? 512) === this.llm.maxBatchTokens
      ? this.llm
      : loadModel(this.modelPath, this.group, { maxBatchTokens: options.maxTokensPerBatch ?? 512 });
    this.engine.close();
    if (llm !== this.llm) {
      this.llm.close();
      this.llm = llm;
    }
    const before = { options: this.options, kvBytes: this.kvBytes, setup: this.setup };
    this.options = options;
    this.kvBytes = kvBudget(llm, options);
    this.setup = { ssms: setup.ssms ?? [], tree: setup.tree, ngram: setup.ngram ?? false };
    try {
      this.engine = this.createEngine(progress);
    } catch (e) {
      // Refused (a tree larger than a batch, a pool that does not fit): keep serving
      // with the settings in force before.
      ({ options: this.options, kvBytes: this.kvBytes, setup: this.setup } = before);
      this.engine = this.createEngine();
      throw e;
    }
  }

  private createEngine(progress: (fraction: number) => void = () => {}): Engine {
    const o = this.options;
    const maxRequests = o.maxRequestsPerBatch ?? 8;
    // No sequence can outgrow the whole pool: a model's (possibly huge) context is capped
    // by what the KV budget holds, which also bounds the block tables.
    const poolTokens = Math.floor(this.kvBytes / kvBytesPerToken(this.llm.config, kvDType(o.kvDtype)));
    const maxSeqLength = Math.min(o.maxSeqLength ?? this.llm.config.maxPositionEmbeddings, this.llm.config.maxPositionEmbeddings, poolTokens);
    const ssms = (this.setup.ssms ?? []).map((p) => this.drafts.get(p)!);
    const speculating = ssms.length > 0 || this.setup.ngram === true;
    const speculator = speculating
      ? createSpeculator(this.llm, maxRequests, { ssms, tree: this.setup.tree, ngram: this.setup.ngram ?? false }, maxSeqLength)
      : null;
    const cost = speculator && ssms.length > 0 && o.measure !== false ? measureCosts(this.llm, ssms, Math.min(this.llm.maxBatchTokens, this.llm.maxLogitRows), maxRequests, progress) : null;
    return createEngine(this.llm, {
      maxRequestsPerBatch: maxRequests,
      maxSeqLength,
      speculator,
      cost,
      tokenizer: this.tokenizer,
      kvMemory: this.kvBytes,
      kvDtype: kvDType(o.kvDtype),
    });
  }

  /** A call's generation settings over the model's own defaults. */
  generationConfig(opts: Partial<GenerationConfig>): Partial<GenerationConfig> {
    return { ...this.defaults, ...definedOnly(opts) };
  }

  close(): void {
    this.engine.close();
    for (const m of this.drafts.values()) m.close();
    this.llm.close();
    this.group.close();
  }
}

/** Refuses a batch limit that is not a positive whole number, naming it. */
function checkLimits(limits: BatchLimits): void {
  for (const name of ["maxRequestsPerBatch", "maxTokensPerBatch", "maxSeqLength"] as const) {
    const v = limits[name];
    if (v !== undefined && !(Number.isInteger(v) && v >= 1)) throw new Error(`${name} must be a whole number >= 1, got ${v}`);
  }
}

/** The KV budget: what maxRequestsPerBatch full-length sequences need, capped at a
 *  quarter of free memory; an explicit kvMemory wins. */
function kvBudget(llm: CausalLM, o: RuntimeOptions): number {
  const perToken = kvBytesPerToken(llm.config, kvDType(o.kvDtype));
  if (o.kvMemory !== undefined) {
    if (!(o.kvMemory > 0)) throw new Error(`kvMemory must be a positive number of bytes, got ${o.kvMemory}`);
    return o.kvMemory;
  }
  const ctx = Math.min(o.maxSeqLength ?? llm.config.maxPositionEmbeddings, llm.config.maxPositionEmbeddings);
  const full = (o.maxRequestsPerBatch ?? 8) * (ctx + 1 + AUTO_MAX_DEPTH + 64) * perToken;
  return Math.min(full, Math.floor(freemem() / 4));
}

/** t(L) of the LLM over a grid of batch sizes, and the SSMs' summed forward time:
 *  the minimum of two runs each, after a warm-up. */
export function measureCosts(llm: CausalLM, ssms: CausalLM[], maxRows: number, maxRequests: number, progress: (f: number) => void = () => {}): CostModel {
  const time = (m: CausalLM, grid: number[]) => {
    const seq = new SequenceRunner(m, grid[grid.length - 1] + 1);
    const tokens = (n: number) => Array.from({ length: n }, (_, i) => 1 + (i % (m.config.vocabSize - 1)));
    seq.feed(tokens(grid[grid.length - 1]), "all", false); // warm-up: page in the weights
    const points = grid.map((l) => {
      let best = Infinity;
      for (let r = 0; r < 2; r++) {
        const t0 = performance.now();
        seq.feed(tokens(l), "all", false);
        best = Math.min(best, performance.now() - t0);
      }
      return { tokens: l, ms: best };
    });
    seq.close();
    return points;
  };
  const llmPoints = time(llm, measurementGrid(Math.min(maxRows, 64)));
  progress(0.7);
  const ssmGrid = measurementGrid(Math.min(2 * maxRequests, 32));
  const summed = ssmGrid.map((l) => ({ tokens: l, ms: 0 }));
  for (const s of ssms) time(s, ssmGrid).forEach((p, i) => (summed[i].ms += p.ms));
  progress(1);
  return new CostModel(new CostCurve(llmPoints), new CostCurve(summed), AUTO_MAX_DEPTH);
}

function readGenerationDefaults(modelPath: string): Partial<GenerationConfig> {
  const file = statSync(modelPath).isDirectory() ? join(modelPath, "generation_config.json") : "";
  if (!file || !existsSync(file)) return {};
  try {
    return generationDefaults(JSON.parse(readFileSync(file, "utf8")));
  } catch {
    return {}; // a broken optional file must not stop the model from loading
  }
}

// The one composition root: plain, serialisable options -> backend, models, tokenizer,
// sampling defaults, KV cache, drafters, cost model and engine. The scripting API (in
// its Worker or in-thread), every CLI command, the server and the benchmarks use it.

import { existsSync, readFileSync, statSync } from "node:fs";
import { freemem } from "node:os";
import { join } from "node:path";
import { DeviceGroup } from "../backend/group";
import type { BackendKind } from "../backend/index";
import { definedOnly, generationDefaults, type GenerationConfig } from "../engine/config";
import { createEngine, type Engine } from "../engine/core";
import { DType } from "../backend/backend";
import { kvBytesPerToken } from "../kv/cache";
import type { CausalLM } from "../model/causal-lm";
import { loadModel } from "../model/registry";
import { AUTO_MAX_DEPTH, createSpeculator, draftGrowth } from "../speculation/speculator";
import { loadTokenizer, type Tokenizer } from "../tokenizer/index";
import { measureCosts, summedCurve } from "./measure";
import { DEFAULT_DRAFT, DEFAULT_MODEL } from "./paths";
import { RemoteDrafters } from "./remote-drafters";

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
  /** Draft on a device of their own: the SSMs run in a Worker with their own backend
   *  context (CPU: its own threads, the cores shared with the LLM's contexts; CUDA: GPU
   *  K with its own stream), and the engine verifies one micro-batch while they draft
   *  the next. Unset: the SSMs draft on the LLM's first device, between its forwards. */
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
    /** The LLM's devices (the SSMs too, unless ssmDevice gives them their own). */
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
    const ssmDevice = options.ssmDevice;
    if (ssmDevice !== undefined && !(Number.isInteger(ssmDevice) && ssmDevice >= 0)) throw new Error(`ssmDevice must be a non-negative integer, got ${ssmDevice}`);
    const group = await DeviceGroup.create({ kind: options.backend, threads: options.threads ?? draftShare(options), tensorParallel });
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
      if (!existsSync(p)) throw new Error(`no such file or directory: ${p}`);
      // On a device of their own the draft worker loads them.
      if (!this.drafts.has(p) && this.options.ssmDevice === undefined) this.drafts.set(p, loadModel(p, this.group.devices[0]!, { maxBatchTokens: 512 }));
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
    const paths = this.setup.ssms ?? [];
    const remote = paths.length > 0 && o.ssmDevice !== undefined
      ? new RemoteDrafters({
          ssms: paths,
          kind: o.backend ?? "cpu",
          device: o.ssmDevice,
          threads: o.threads ?? draftShare(o),
          maxSeqs: maxRequests,
          maxSeqLen: maxSeqLength,
          maxGrowth: draftGrowth(this.setup.tree),
          vocab: this.llm.config.vocabSize,
        })
      : null;
    const ssms = remote ? [] : paths.map((p) => this.drafts.get(p)!);
    const speculating = paths.length > 0 || this.setup.ngram === true;
    let speculator = null;
    try {
      speculator = speculating
        ? createSpeculator(this.llm, maxRequests, { ssms, drafters: remote ?? undefined, tree: this.setup.tree, ngram: this.setup.ngram ?? false }, maxSeqLength)
        : null;
    } catch (e) {
      remote?.closeAll();
      throw e;
    }
    const draftCurve = (grid: number[]) => (remote ? remote.measure(grid) : summedCurve(ssms, grid));
    const cost = speculator && paths.length > 0 && o.measure !== false ? measureCosts(this.llm, draftCurve, Math.min(this.llm.maxBatchTokens, this.llm.maxLogitRows), maxRequests, progress) : null;
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

/** CPU threads per context when the SSMs have a device of their own: the cores shared
 *  out over the LLM's contexts and theirs. */
function draftShare(o: RuntimeOptions): number | undefined {
  if (o.ssmDevice === undefined || (o.backend ?? "cpu") !== "cpu") return undefined;
  return Math.max(1, Math.floor(navigator.hardwareConcurrency / ((o.tensorParallel ?? 1) + 1)));
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

function readGenerationDefaults(modelPath: string): Partial<GenerationConfig> {
  const file = statSync(modelPath).isDirectory() ? join(modelPath, "generation_config.json") : "";
  if (!file || !existsSync(file)) return {};
  try {
    return generationDefaults(JSON.parse(readFileSync(file, "utf8")));
  } catch {
    return {}; // a broken optional file must not stop the model from loading
  }
}

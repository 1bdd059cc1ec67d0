// One generation request as the engine sees it: its tokens, sampling state, how it
// speculates, its text (detokenised, stop strings) and its statistics. Plain state;
// the scheduler, runner and update move it along.

import type { Tokenizer } from "../tokenizer/tokenizer";
import { Rng } from "../speculation/rng";
import type { SamplingParams } from "../speculation/sampling";
import type { DraftPlan } from "../speculation/speculator";
import type { GenerationConfig } from "./config";
import { RequestStats } from "./stats";
import { TextStream } from "./text";

export type FinishReason = "stop" | "length" | "cancelled" | "error";

export interface TokenLogprob {
  token: number;
  logprob: number;
  /** The most likely tokens at this position, most likely first. */
  top: { token: number; logprob: number }[];
}

/** How a request speculates: not at all, a fixed plan, or a plan the cost model picks
 *  each step. */
export type SpeculationMode = { kind: "off" } | { kind: "fixed"; plan: DraftPlan } | { kind: "auto"; ngram: boolean };

/** Decaying acceptance rate per depth of a chain (auto speculation). */
export class AcceptanceByDepth {
  constructor(readonly rates: number[], private readonly weight = 0.1) {}

  /** A chain of `tried` nodes was verified and its first `accepted` kept. */
  observe(tried: number, accepted: number): void {
    for (let d = 0; d < Math.min(tried, accepted + 1); d++) {
      this.rates[d] += this.weight * ((d < accepted ? 1 : 0) - this.rates[d]);
    }
  }

  /** Moves every rate a share `weight` of the way to `other`'s. */
  relaxToward(other: AcceptanceByDepth, weight: number): void {
    for (let d = 0; d < this.rates.length; d++) this.rates[d] += weight * ((other.rates[d] ?? this.rates[d]) - this.rates[d]);
  }

  /** Expected tokens from one step with a chain of `depth` nodes (the LLM's own included). */
  expectedTokens(depth: number): number {
    let total = 1;
    let reach = 1;
    for (let d = 0; d < depth; d++) {
      reach *= this.rates[d];
      total += reach;
    }
    return total;
  }
}

export class Request {
  /** Prompt + generated tokens (what a recompute after preemption prefills). */
  readonly tokens: number[];
  readonly generated: number[] = [];
  readonly fromDraft: boolean[] = [];
  readonly logprobs: TokenLogprob[] | null;
  readonly stats = new RequestStats();
  readonly rng: Rng;
  readonly params: SamplingParams;
  /** Text and stop strings; null without a tokenizer (token ids only). */
  readonly text: TextStream | null;
  /** LLM KV row while running, -1 otherwise. */
  row = -1;
  /** Admission order (later admitted = preempted first). */
  admittedAt = -1;
  finishReason: FinishReason | null = null;
  error: string | null = null;
  /** Decode steps since the last speculative one (auto probes now and then). */
  stepsWithoutDraft = 0;

  constructor(
    readonly id: number,
    readonly prompt: readonly number[],
    readonly config: GenerationConfig,
    readonly speculation: SpeculationMode,
    readonly acceptance: AcceptanceByDepth,
    tokenizer: Tokenizer | null,
  ) {
    this.tokens = [...prompt];
    this.rng = new Rng(config.seed);
    this.params = {
      temperature: config.temperature,
      topK: config.topK,
      topP: config.topP,
      minP: config.minP,
      repetitionPenalty: config.repetitionPenalty,
      presencePenalty: config.presencePenalty,
      frequencyPenalty: config.frequencyPenalty,
      logitBias: new Map(Object.entries(config.logitBias).map(([k, v]) => [Number(k), v])),
    };
    this.logprobs = config.logprobs === undefined ? null : [];
    this.text = tokenizer ? new TextStream(tokenizer, prompt, config.stop) : null;
  }

  get done(): boolean {
    return this.finishReason !== null;
  }

  /** Tokens whose K/V must be in the cache before a decode step: all but the root
   *  (the last token). A fresh request prefills its whole prompt instead, the last
   *  chunk yielding its first token. */
  get prefillTarget(): number {
    return this.generated.length > 0 ? this.tokens.length - 1 : this.tokens.length;
  }
}

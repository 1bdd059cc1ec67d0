// What the HTTP server needs from the engine: the scripting API's LLM (engine in a
// Worker, or in-thread in tests). Declared here as the subset the server uses, so the
// routes depend on this shape only.

import type { ChatMessage } from "../tokenizer/index";

export type Prompt = string | number[];

export interface GenerationSettings {
  maxNewTokens?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  logitBias?: Record<number, number>;
  seed?: number;
  stop?: string[];
  ignoreEos?: boolean;
  /** undefined: none; 0: the chosen token's log-probability; k > 0: also the top k. */
  logprobs?: number;
  speculation?: false | "auto" | { tree?: string; ngram?: boolean };
  /** Aborting cancels the request and frees its KV blocks. */
  signal?: AbortSignal;
}

export interface TokenLogprob {
  token: number;
  logprob: number;
  top: { token: number; logprob: number }[];
}

export interface StreamPiece {
  text: string;
  tokens: number[];
  fromDraft: boolean[];
  logprobs?: TokenLogprob[];
}

export interface RequestStatsSummary {
  promptTokens: number;
  generatedTokens: number;
  decodeSteps: number;
  draftTokens: number;
  acceptedTokens: number;
}

export interface GenerationResult {
  text: string;
  tokens: number[];
  fromDraft: boolean[];
  logprobs?: TokenLogprob[];
  finishReason: "stop" | "length" | "cancelled";
  stats: RequestStatsSummary;
}

export interface EngineStats {
  running: number;
  waiting: number;
  kvBlocksUsed: number;
  kvBlocksTotal: number;
  preemptions: number;
  promptTokens: number;
  generatedTokens: number;
  numDrafts: number;
  numDraftTokens: number;
  numAcceptedTokens: number;
  acceptedPerPosition: number[];
}

export interface ServingLLM {
  readonly tokenizer: {
    encode(text: string): number[];
    decode(ids: readonly number[]): string;
  };
  readonly info: { model: string; contextLength: number; vocabSize: number };
  chatPrompt(messages: ChatMessage[]): number[];
  stream(prompt: Prompt, opts?: GenerationSettings): AsyncGenerator<StreamPiece, GenerationResult>;
  stats(): Promise<EngineStats>;
}

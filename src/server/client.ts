// What the HTTP server uses of the scripting API's LLM (engine in its Worker, or
// in-thread in tests): the routes depend on this much of it only.

import type { LLM } from "../index";

export type ServingLLM = Pick<LLM, "tokenizer" | "info" | "chatPrompt" | "stream" | "stats">;

export type { EngineStats, GenerateOptions, GenerationResult, StreamPiece, TokenLogprob } from "../index";

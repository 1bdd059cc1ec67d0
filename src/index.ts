// The public API of specinfer:
//
//   const llm = await LLM.load();                       // the embedded default pair
//   const out = await llm.generate("ROMEO:", { maxNewTokens: 32 });
//   for await (const piece of llm.stream("JULIET:")) process.stdout.write(piece.text);
//   await llm.close();

export { LLM, SSM } from "./api/llm";
export type { CompileOptions, GenerateOptions, GenerationResult, LoadOptions, StreamPiece } from "./api/llm";
export { ConfigError } from "./engine/config";
export type { GenerationConfig, Speculation } from "./engine/config";
export { RequestError } from "./engine/core";
export { ModelFormatError, ModelTooLargeError } from "./model/errors";
export type { EngineStats } from "./engine/core";
export { EngineClosedError } from "./runtime/client";
export type { FinishReason, TokenLogprob } from "./engine/request";
export type { StatsSummary } from "./engine/stats";
export type { EngineInfo } from "./runtime/load";
export { DEFAULT_DRAFT, DEFAULT_MODEL } from "./runtime/paths";
export type { ChatMessage } from "./tokenizer/index";

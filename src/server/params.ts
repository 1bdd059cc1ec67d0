// OpenAI request bodies: their zod schemas and how they map to generation settings.
// Unknown fields are stripped (ignored), as OpenAI-compatible servers do; parameters
// we do not implement are accepted only at their default value.

import { z } from "zod";
import { ApiError, badRequest } from "./errors";
import type { ServingLLM, GenerateOptions } from "./client";

/** Temperatures under this are greedy, as in vLLM: dividing logits by a denormal one
 *  overflows them to Infinity. */
export const GREEDY_BELOW = 1e-5;
export const MIN_REPETITION_PENALTY = 0.01;

/** Most choices one request may ask for (each is its own generation). */
export const MAX_N = 16;

const unsupported = (isDefault: (v: unknown) => boolean) =>
  z.unknown().refine((v) => v === null || isDefault(v), { message: "is not supported by this server" }).optional();

const emptyList = (v: unknown) => Array.isArray(v) && v.length === 0;

const speculation = z.union([
  z.literal(false),
  z.literal("auto"),
  z.strictObject({ tree: z.string().min(1).optional(), ngram: z.boolean().optional() }),
], { error: 'must be false, "auto" or { "tree": "1,1,3", "ngram": true }' });

/** Fields shared by /completions and /chat/completions. */
const common = {
  model: z.string().nullish(),
  max_tokens: z.int().min(1).nullish(),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  n: z.int().min(1).max(MAX_N).nullish(),
  seed: z.int().nullish(),
  stop: z.union([z.string().min(1), z.array(z.string().min(1)).max(16)], { error: "must be a non-empty string or a list of at most 16 of them" }).nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
  presence_penalty: z.number().min(-2).max(2).nullish(),
  frequency_penalty: z.number().min(-2).max(2).nullish(),
  logit_bias: z.record(z.string().regex(/^\d+$/, "keys must be token ids"), z.number().min(-100).max(100)).nullish(),
  user: z.string().nullish(),
  // Extensions (vLLM / llama.cpp names), and this engine's speculation switch.
  top_k: z.int().min(-1).nullish(), // -1 = off, as in vLLM
  min_p: z.number().min(0).max(1).nullish(),
  // Logits are divided by the penalty (and the temperature): a denormal one overflows
  // them to Infinity and sampling fails, so the range starts where that cannot happen.
  repetition_penalty: z.number().min(MIN_REPETITION_PENALTY).max(100).nullish(),
  ignore_eos: z.boolean().nullish(),
  speculation: speculation.nullish(),
};

const tokenIds = z.array(z.int().min(0)).min(1);

export const CompletionBody = z.object({
  ...common,
  prompt: z.union([z.string(), z.array(z.string()).min(1), tokenIds, z.array(tokenIds).min(1)], {
    error: "must be a string, a list of strings, a list of token ids or a list of such lists",
  }),
  logprobs: z.int().min(0).max(20).nullish(),
  echo: unsupported((v) => v === false),
  suffix: unsupported((v) => v === ""),
  best_of: unsupported((v) => v === 1),
});

const textPart = z.object({ type: z.string(), text: z.string().optional() }).refine((p) => p.type === "text" && typeof p.text === "string", {
  message: 'only text content parts ({"type":"text","text":...}) are supported',
});

const message = z.object({
  role: z.enum(["system", "developer", "user", "assistant", "tool"]),
  content: z.union([z.string(), z.array(textPart)]).nullish(),
});

export const ChatBody = z.object({
  ...common,
  messages: z.array(message).min(1, "must contain at least one message"),
  max_completion_tokens: z.int().min(1).nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.int().min(0).max(20).nullish(),
  tools: unsupported(emptyList),
  tool_choice: unsupported((v) => v === "none"),
  functions: unsupported(emptyList),
  function_call: unsupported((v) => v === "none"),
  response_format: unsupported((v) => (v as { type?: unknown }).type === "text"),
  audio: unsupported(() => false),
  modalities: unsupported((v) => Array.isArray(v) && v.length === 1 && v[0] === "text"),
  prediction: unsupported(() => false),
}).refine((b) => b.top_logprobs == null || b.logprobs === true, { message: "needs logprobs: true", path: ["top_logprobs"] });

export type CompletionRequest = z.infer<typeof CompletionBody>;
export type ChatRequest = z.infer<typeof ChatBody>;
type CommonRequest = CompletionRequest | ChatRequest;

/** The model a request names must be the one served (a missing name means it). */
export function checkModel(requested: string | null | undefined, served: string): void {
  if (requested != null && requested !== served) {
    throw new ApiError(404, `The model "${requested}" does not exist; this server serves "${served}"`, "model", "model_not_found");
  }
}

/** Generation settings of one choice, before its seed (see choiceSeeds). */
export function generationSettings(body: CommonRequest, logprobs: number | undefined, vocabSize: number): GenerateOptions {
  return {
    maxNewTokens: ("max_completion_tokens" in body ? body.max_completion_tokens : undefined) ?? body.max_tokens ?? undefined,
    temperature: body.temperature == null ? undefined : body.temperature < GREEDY_BELOW ? 0 : body.temperature,
    topP: body.top_p ?? undefined,
    topK: body.top_k === -1 ? 0 : (body.top_k ?? undefined),
    minP: body.min_p ?? undefined,
    repetitionPenalty: body.repetition_penalty ?? undefined,
    presencePenalty: body.presence_penalty ?? undefined,
    frequencyPenalty: body.frequency_penalty ?? undefined,
    logitBias: body.logit_bias ? logitBias(body.logit_bias, vocabSize) : undefined,
    ignoreEos: body.ignore_eos ?? undefined,
    stop: body.stop == null ? undefined : typeof body.stop === "string" ? [body.stop] : body.stop,
    logprobs,
    speculation: body.speculation ?? undefined,
  };
}

function logitBias(bias: Record<string, number>, vocabSize: number): Record<number, number> {
  const out: Record<number, number> = {};
  for (const [key, value] of Object.entries(bias)) {
    const id = Number(key);
    if (id >= vocabSize) throw badRequest(`logit_bias: token id ${id} is outside the vocabulary (0..${vocabSize - 1})`, "logit_bias");
    out[id] = value;
  }
  return out;
}

/** How many choices, their seed, and how the answer is sent. */
export function choiceOptions(body: CommonRequest) {
  return {
    n: body.n ?? 1,
    seed: body.seed,
    stream: body.stream ?? false,
    includeUsage: body.stream_options?.include_usage ?? false,
  };
}

/** `n` choices per prompt: seed + i when a seed is given, else a fresh random seed each
 *  (the engine's default seed would make every choice the same). */
export function choiceSeeds(n: number, seed: number | null | undefined): number[] {
  return Array.from({ length: n }, (_, i) => (seed == null ? crypto.getRandomValues(new Uint32Array(1))[0] : seed + i));
}

/** The prompts of a /completions body as token ids. */
export function completionPrompts(prompt: CompletionRequest["prompt"], tokenizer: ServingLLM["tokenizer"]): number[][] {
  if (typeof prompt === "string") return [tokenizer.encode(prompt)];
  if (prompt.every((p) => typeof p === "string")) return (prompt as string[]).map((p) => tokenizer.encode(p));
  if (prompt.every((p) => typeof p === "number")) return [prompt as number[]];
  return prompt as number[][];
}

/** Chat messages with their content flattened to text. */
export function chatMessages(messages: ChatRequest["messages"]): { role: string; content: string }[] {
  return messages.map((m) => ({
    role: m.role,
    content: typeof m.content === "string" ? m.content : (m.content ?? []).map((p) => p.text ?? "").join(""),
  }));
}

/** Rejects prompts the context cannot hold, naming the parameter to change. */
export function checkContext(prompts: number[][], maxNewTokens: number | undefined, info: ServingLLM["info"], names: { prompt: string; maxTokens: string }): void {
  const vocab = info.vocabSize;
  for (const p of prompts) {
    const bad = p.find((t) => t >= vocab);
    if (bad !== undefined) throw badRequest(`${names.prompt}: token id ${bad} is outside the vocabulary (0..${vocab - 1})`, names.prompt);
    if (p.length >= info.contextLength) {
      throw badRequest(`${names.prompt} has ${p.length} tokens; the model's context is ${info.contextLength}`, names.prompt);
    }
    if (maxNewTokens !== undefined && p.length + maxNewTokens > info.contextLength) {
      throw badRequest(
        `${names.prompt} (${p.length} tokens) + ${names.maxTokens} (${maxNewTokens}) is past the model's context of ${info.contextLength} tokens`,
        names.maxTokens,
      );
    }
  }
}

// How /completions and /chat/completions answers look: choices, log-probabilities,
// usage, and the speculation extension fields.

import type { GenerationResult, ServingLLM, TokenLogprob } from "./client";

/** One emitted token's log-probability with the texts of it and its alternatives. */
export interface NamedLogprob {
  text: string;
  logprob: number;
  top: { text: string; logprob: number }[];
}

/** Names tokens by their text in context: the previous token is decoded with it so a
 *  leading space survives (SentencePiece drops it at the start of a decode). */
export function tokenNamer(tokenizer: ServingLLM["tokenizer"], previous: number | undefined) {
  const textOf = (id: number, prev: number | undefined) =>
    prev === undefined ? tokenizer.decode([id]) : tokenizer.decode([prev, id]).slice(tokenizer.decode([prev]).length);
  return (entries: TokenLogprob[]): NamedLogprob[] =>
    entries.map((e) => {
      const prev = previous;
      previous = e.token;
      return { text: textOf(e.token, prev), logprob: e.logprob, top: e.top.map((t) => ({ text: textOf(t.token, prev), logprob: t.logprob })) };
    });
}

export interface Shape {
  idPrefix: string;
  object: string;
  chunkObject: string;
  /** Fields of a streamed piece's choice; `offset`: token text emitted before it. */
  delta(text: string, logprobs: NamedLogprob[] | null, offset: number): Record<string, unknown>;
  /** Fields of a finished non-streamed choice. */
  whole(text: string, logprobs: NamedLogprob[] | null): Record<string, unknown>;
  /** A first chunk per streamed choice (chat announces the role), or null. */
  opening: Record<string, unknown> | null;
}

const utf8 = new TextEncoder();

function chatLogprobs(entries: NamedLogprob[] | null) {
  if (!entries) return null;
  return {
    content: entries.map((e) => ({
      token: e.text,
      logprob: e.logprob,
      bytes: [...utf8.encode(e.text)],
      top_logprobs: e.top.map((t) => ({ token: t.text, logprob: t.logprob, bytes: [...utf8.encode(t.text)] })),
    })),
  };
}

export const chatShape: Shape = {
  idPrefix: "chatcmpl-",
  object: "chat.completion",
  chunkObject: "chat.completion.chunk",
  delta: (text, logprobs) => ({ delta: { content: text }, logprobs: chatLogprobs(logprobs) }),
  whole: (text, logprobs) => ({ message: { role: "assistant", content: text }, logprobs: chatLogprobs(logprobs) }),
  opening: { delta: { role: "assistant", content: "" }, logprobs: null },
};

function legacyLogprobs(entries: NamedLogprob[] | null, offset: number) {
  if (!entries) return null;
  const starts: number[] = [];
  for (const e of entries) {
    starts.push(offset);
    offset += e.text.length;
  }
  return {
    tokens: entries.map((e) => e.text),
    token_logprobs: entries.map((e) => e.logprob),
    top_logprobs: entries.map((e) => Object.fromEntries(e.top.map((t) => [t.text, t.logprob]))),
    text_offset: starts,
  };
}

/** The legacy completions shape; text_offset counts from the start of the completion. */
export const completionShape: Shape = {
  idPrefix: "cmpl-",
  object: "text_completion",
  chunkObject: "text_completion",
  delta: (text, logprobs, offset) => ({ text, logprobs: legacyLogprobs(logprobs, offset) }),
  whole: (text, logprobs) => ({ text, logprobs: legacyLogprobs(logprobs, 0) }),
  opening: null,
};

export function usage(promptTokens: number, completionTokens: number) {
  return { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens };
}

/** This engine's extension: how speculation went for the generations in a response. */
export function speculationStats(stats: GenerationResult["stats"][]) {
  const sum = (f: (s: GenerationResult["stats"]) => number) => stats.reduce((a, s) => a + f(s), 0);
  const steps = sum((s) => s.decodeSteps);
  const accepted = sum((s) => s.acceptedTokens);
  return {
    draft_tokens: sum((s) => s.draftTokens),
    accepted_tokens: accepted,
    // Tokens per decode step, the target model's own token included.
    mean_accepted_length: steps > 0 ? (accepted + steps) / steps : 0,
  };
}

export const finishReason = (r: GenerationResult["finishReason"]) => (r === "length" ? "length" : "stop");

// Runs a request's choices (n per prompt, each its own generation) and answers as one
// JSON body or as an SSE stream of chunks. Shared by /completions and /chat/completions.

import type { Context } from "hono";
import type { ServingLLM, GenerationResult, GenerateOptions, StreamPiece } from "./client";
import { ApiError } from "./errors";
import type { ServerMetrics } from "./metrics";
import { choiceSeeds } from "./params";
import { finishReason, speculationStats, tokenNamer, usage, type NamedLogprob, type Shape } from "./responses";
import { sseResponse } from "./sse";

/** What the route handlers share. */
export interface Deps {
  /** The engine once loaded; throws a 503 while it loads. */
  engine(): ServingLLM;
  /** The engine once loaded, else null. */
  loadedEngine(): ServingLLM | null;
  metrics: ServerMetrics;
  admission: Admission;
  servedModelName: string;
}

/** Counts generations in flight; past the limit a request is refused (429) rather than
 *  queued without bound. A request alone is always let in, whatever its n. */
export class Admission {
  private inFlight = 0;

  constructor(private readonly limit: number) {}

  admit(count: number): () => void {
    if (this.inFlight > 0 && this.inFlight + count > this.limit) {
      throw new ApiError(429, `the server is busy (${this.inFlight} generations in flight, limit ${this.limit}); retry shortly`, null, "queue_full", { "Retry-After": "1" });
    }
    this.inFlight += count;
    let released = false;
    return () => {
      if (!released) this.inFlight -= count;
      released = true;
    };
  }
}

export interface Job {
  prompts: number[][];
  n: number;
  seed: number | null | undefined;
  settings: GenerateOptions;
  stream: boolean;
  includeUsage: boolean;
  shape: Shape;
}

interface Choice {
  index: number;
  prompt: number[];
  settings: GenerateOptions;
}

export function respond(c: Context, deps: Deps, job: Job): Response | Promise<Response> {
  const llm = deps.engine();
  const choices: Choice[] = job.prompts.flatMap((prompt, p) =>
    choiceSeeds(job.n, job.seed).map((seed, i) => ({ index: p * job.n + i, prompt, settings: { ...job.settings, seed } })),
  );
  const release = deps.admission.admit(choices.length);
  const arrival = performance.now();
  const header = { id: job.shape.idPrefix + crypto.randomUUID(), created: Math.floor(Date.now() / 1000), model: deps.servedModelName };
  const promptTokens = job.prompts.reduce((a, p) => a + p.length, 0);
  const run = (choice: Choice, signal: AbortSignal, onPiece?: (piece: StreamPiece) => void) =>
    runChoice(llm, deps.metrics, choice, signal, arrival, onPiece);

  if (!job.stream) {
    return (async () => {
      // Ends the siblings of a choice that failed, as well as all when the client leaves.
      const over = new AbortController();
      const signal = AbortSignal.any([c.req.raw.signal, over.signal]);
      try {
        const results = await Promise.all(choices.map((ch) => run(ch, signal)));
        if (results.some((r) => r === null)) throw new ApiError(400, "the client closed the request");
        const done = results as GenerationResult[];
        return c.json({
          ...header,
          object: job.shape.object,
          choices: done.map((r, i) => ({
            index: choices[i].index,
            ...job.shape.whole(r.text, r.logprobs ? tokenNamer(llm.tokenizer, choices[i].prompt.at(-1))(r.logprobs) : null),
            finish_reason: finishReason(r.finishReason),
            from_draft: r.fromDraft,
            token_ids: r.tokens,
          })),
          usage: usage(promptTokens, done.reduce((a, r) => a + r.tokens.length, 0)),
          speculation: speculationStats(done.map((r) => r.stats)),
        });
      } finally {
        over.abort();
        release();
      }
    })();
  }

  const chunk = (index: number, fields: Record<string, unknown>, extra: Record<string, unknown> = {}) => ({
    ...header,
    object: job.shape.chunkObject,
    choices: [{ index, ...fields }],
    ...(job.includeUsage ? { usage: null } : {}),
    ...extra,
  });
  return sseResponse(c.req.raw, async (send, signal) => {
    try {
      let completionTokens = 0;
      await Promise.all(
        choices.map(async (ch) => {
          if (job.shape.opening) send(chunk(ch.index, { ...job.shape.opening, finish_reason: null }));
          const name = tokenNamer(llm.tokenizer, ch.prompt.at(-1));
          let offset = 0;
          const result = await run(ch, signal, (piece) => {
            if (piece.tokens.length === 0 && piece.text === "") return;
            const named: NamedLogprob[] | null = piece.logprobs ? name(piece.logprobs) : null;
            send(chunk(ch.index, { ...job.shape.delta(piece.text, named, offset), finish_reason: null, from_draft: piece.fromDraft, token_ids: piece.tokens }));
            offset += named?.reduce((a, e) => a + e.text.length, 0) ?? 0;
          });
          if (!result) return;
          completionTokens += result.tokens.length;
          const last = { ...job.shape.delta("", null, offset), finish_reason: finishReason(result.finishReason) };
          send(chunk(ch.index, last, { speculation: speculationStats([result.stats]) }));
        }),
      );
      if (job.includeUsage && !signal.aborted) send({ ...header, object: job.shape.chunkObject, choices: [], usage: usage(promptTokens, completionTokens) });
    } finally {
      release();
    }
  });
}

/** One generation, fed through the engine's stream so latencies are observed as tokens
 *  arrive. Resolves null when the client went away (the generation is then cancelled). */
async function runChoice(
  llm: ServingLLM,
  metrics: ServerMetrics,
  choice: Choice,
  signal: AbortSignal,
  arrival: number,
  onPiece?: (piece: StreamPiece) => void,
): Promise<GenerationResult | null> {
  const timing = metrics.startRequest(arrival);
  const pieces = llm.stream(choice.prompt, { ...choice.settings, signal });
  try {
    for (;;) {
      if (signal.aborted) return null;
      const next = await pieces.next();
      if (next.done) {
        timing.finished();
        return signal.aborted ? null : next.value;
      }
      if (next.value.tokens.length > 0) timing.tokens(next.value.tokens.length);
      onPiece?.(next.value);
    }
  } finally {
    // Ends the engine request if it is still running (breaking out cancels it).
    await pieces.return(undefined as never);
  }
}

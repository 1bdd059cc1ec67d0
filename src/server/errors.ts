// Every error the server answers with, in OpenAI's shape
// {"error":{"message","type","param","code"}}, built in this one place.

import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";

export class ApiError extends Error {
  constructor(
    readonly status: ContentfulStatusCode,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ApiError";
  }

  get type(): string {
    return ERROR_TYPES[this.status] ?? (this.status >= 500 ? "server_error" : "invalid_request_error");
  }

  body() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

const ERROR_TYPES: Partial<Record<number, string>> = {
  401: "authentication_error",
  404: "not_found_error",
  429: "rate_limit_error",
  503: "service_unavailable",
};

export const badRequest = (message: string, param: string | null = null) => new ApiError(400, message, param);

export function errorResponse(c: Context, e: ApiError): Response {
  return c.json(e.body(), e.status, e.headers);
}

/** A zod failure as a 400 naming the first offending field, e.g. "messages[0].content". */
export function fromZod(error: { issues: readonly { path: readonly PropertyKey[]; message: string }[] }): ApiError {
  const issue = error.issues[0];
  const param = issue.path.reduce<string>((s, k) => (typeof k === "number" ? `${s}[${k}]` : s ? `${s}.${String(k)}` : String(k)), "");
  return badRequest(param ? `${param}: ${issue.message}` : issue.message, param || null);
}

/** Engine errors that are the caller's fault carry the field they concern. */
const ENGINE_FIELDS: Record<string, string> = {
  maxNewTokens: "max_tokens",
  temperature: "temperature",
  topK: "top_k",
  topP: "top_p",
  minP: "min_p",
  repetitionPenalty: "repetition_penalty",
  presencePenalty: "presence_penalty",
  frequencyPenalty: "frequency_penalty",
  logitBias: "logit_bias",
  seed: "seed",
  stop: "stop",
  logprobs: "logprobs",
  speculation: "speculation",
};

/** Anything thrown while handling a request, as the ApiError to answer with. */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof HTTPException) return new ApiError(e.status as ContentfulStatusCode, e.message || "request failed");
  const err = e instanceof Error ? e : new Error(String(e));
  if (err.name === "RequestError" || err.name === "ConfigError") {
    const param = (err as { param?: string }).param ?? Object.keys(ENGINE_FIELDS).find((f) => err.message.startsWith(f));
    return badRequest(err.message, param ? (ENGINE_FIELDS[param] ?? param) : null);
  }
  if (err.name === "EngineClosedError") return new ApiError(503, err.message);
  return new ApiError(500, err.message || "internal error");
}

// The OpenAI-compatible HTTP API as a Hono app built from an engine client (or the
// promise of one: until it resolves, /health and the generation routes answer 503).
// Routes answer with and without the /v1 prefix, as llama.cpp's server does.

import { createHash, timingSafeEqual } from "node:crypto";
import { Hono, type MiddlewareHandler } from "hono";
import { bodyLimit } from "hono/body-limit";
import { methodNotAllowed } from "hono/method-not-allowed";
import type { ServingLLM } from "./client";
import { ApiError, errorResponse, toApiError } from "./errors";
import { Admission, type Deps } from "./generation";
import { ServerMetrics } from "./metrics";
import { chatRoute } from "./routes/chat";
import { completionsRoute } from "./routes/completions";
import { healthRoute } from "./routes/health";
import { metricsRoute } from "./routes/metrics";
import { modelsRoute } from "./routes/models";

export interface ServerOptions {
  /** The model id clients name (GET /v1/models lists it). */
  servedModelName: string;
  /** When set, every route but /health needs `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Largest request body, in bytes (default 4 MiB); larger ones get a 413. */
  maxBodyBytes?: number;
  /** Generations in flight (running + waiting) past which requests get a 429. */
  maxInFlight?: number;
}

export const DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024;

export function createApp(engine: ServingLLM | Promise<ServingLLM>, options: ServerOptions): Hono {
  let loaded: ServingLLM | null = engine instanceof Promise ? null : engine;
  let loadError: Error | null = null;
  if (engine instanceof Promise) {
    engine.then(
      (e) => void (loaded = e),
      (e) => void (loadError = e instanceof Error ? e : new Error(String(e))),
    );
  }
  const deps: Deps = {
    engine: () => {
      if (loaded) return loaded;
      throw new ApiError(503, loadError ? `the model failed to load: ${loadError.message}` : "the model is loading; retry shortly", null, "model_loading");
    },
    loadedEngine: () => loaded,
    metrics: new ServerMetrics(),
    admission: new Admission(options.maxInFlight ?? Infinity),
    servedModelName: options.servedModelName,
  };
  const api = new Hono()
    .route("/", completionsRoute(deps))
    .route("/", chatRoute(deps))
    .route("/", modelsRoute(deps))
    .route("/", healthRoute(deps))
    .route("/", metricsRoute(deps));

  const app = new Hono();
  app.use(requireApiKey(options.apiKey));
  const maxBody = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  app.use(bodyLimit({ maxSize: maxBody, onError: (c) => errorResponse(c, new ApiError(413, `the request body is over the limit of ${maxBody} bytes`, null, "body_too_large")) }));
  app.use(
    methodNotAllowed({
      app,
      onMethodNotAllowed: (c, allowed) =>
        errorResponse(c, new ApiError(405, `${c.req.method} is not allowed on ${c.req.path} (allowed: ${allowed.join(", ")})`, null, "method_not_allowed", { Allow: allowed.join(", ") })),
    }),
  );
  app.route("/v1", api);
  app.route("/", api);
  app.notFound((c) => errorResponse(c, new ApiError(404, `no route for ${c.req.method} ${c.req.path}`, null, "not_found")));
  app.onError((e, c) => {
    const error = toApiError(e);
    if (error.status >= 500 && error.status !== 503) console.error(e);
    return errorResponse(c, error);
  });
  return app;
}

const isHealth = (path: string) => path === "/health" || path === "/v1/health";

function requireApiKey(key: string | undefined): MiddlewareHandler {
  return async (c, next) => {
    if (key && !isHealth(c.req.path)) {
      const given = /^Bearer\s+(.+)$/i.exec(c.req.header("Authorization") ?? "")?.[1];
      if (given === undefined) throw new ApiError(401, "missing API key: send the header Authorization: Bearer <key>", null, "invalid_api_key");
      if (!sameSecret(given, key)) throw new ApiError(401, "incorrect API key", null, "invalid_api_key");
    }
    await next();
  };
}

/** Constant-time comparison (digests have one length whatever the inputs). */
function sameSecret(a: string, b: string): boolean {
  const digest = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(digest(a), digest(b));
}

// Bun.serve around the app. Idle connections close after `idleTimeout` seconds, but a
// generation request may be silent far longer (a long prefill, a queue wait, a whole
// non-streamed answer), so those requests get no idle timeout at all.

import type { Hono } from "hono";
import { DEFAULT_MAX_BODY_BYTES } from "./app";

export interface ListenOptions {
  hostname: string;
  /** 0 picks a free port. */
  port: number;
  /** Seconds an idle connection stays open (Bun's default: 10). */
  idleTimeout?: number;
  /** Bun's own cap on bodies; keep it above the app's limit so the app answers 413 as JSON. */
  maxBodyBytes?: number;
}

export function listen(app: Hono, opts: ListenOptions) {
  return Bun.serve({
    hostname: opts.hostname,
    port: opts.port,
    idleTimeout: opts.idleTimeout ?? 10,
    maxRequestBodySize: 2 * (opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES),
    fetch(request, server) {
      if (request.method === "POST") server.timeout(request, 0);
      return app.fetch(request);
    },
  });
}

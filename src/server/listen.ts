// Bun.serve around the app. Bun closes a connection idle for `idleTimeout` seconds, but
// a generation may be silent far longer (a long prefill, a queue wait, a whole
// non-streamed answer): POST requests get no idle timeout until their answer is
// written, then the connection idles out as usual.

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
  const idle = opts.idleTimeout ?? 10;
  return Bun.serve({
    hostname: opts.hostname,
    port: opts.port,
    idleTimeout: idle,
    maxRequestBodySize: 2 * (opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES),
    async fetch(request, server) {
      if (request.method !== "POST") return app.fetch(request);
      server.timeout(request, 0);
      const response = await app.fetch(request);
      const restore = () => server.timeout(request, idle);
      if (!response.body || !response.headers.get("Content-Type")?.startsWith("text/event-stream")) {
        restore();
        return response;
      }
      return new Response(response.body.pipeThrough(new TransformStream({ flush: restore })), response);
    },
  });
}

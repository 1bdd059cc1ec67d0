// Bun.serve around the app. Bun closes a connection idle for `idleTimeout` seconds, but
// a generation may be silent far longer (a long prefill, a queue wait, a whole
// non-streamed answer). So a POST body is first read whole under the idle timeout (a
// client that stops sending mid-body is cut off, not waited on forever), then the
// request gets no idle timeout until its answer is written, and the connection idles
// out as usual afterwards.

import type { Hono } from "hono";
import { DEFAULT_MAX_BODY_BYTES } from "./app";
import { ApiError } from "./errors";

export interface ListenOptions {
  hostname: string;
  /** 0 picks a free port. */
  port: number;
  /** Seconds an idle connection stays open (Bun's default: 10). */
  idleTimeout?: number;
  /** Largest POST body, in bytes (default 4 MiB, the app's default); a larger one gets a
   *  JSON 413 without being read whole. */
  maxBodyBytes?: number;
}

export function listen(app: Hono, opts: ListenOptions) {
  const idle = opts.idleTimeout ?? 10;
  const maxBody = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  return Bun.serve({
    hostname: opts.hostname,
    port: opts.port,
    idleTimeout: idle,
    // Bun's own refusal is a bare 413; readBody enforces the limit with a JSON one.
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    async fetch(request, server) {
      if (request.method !== "POST") return app.fetch(request);
      const body = await readBody(request, maxBody);
      if (body instanceof Response) return body;
      server.timeout(request, 0);
      const response = await app.fetch(new Request(request.url, { method: "POST", headers: request.headers, body, signal: request.signal }));
      const restore = () => server.timeout(request, idle);
      if (!response.body || !response.headers.get("Content-Type")?.startsWith("text/event-stream")) {
        restore();
        return response;
      }
      return new Response(response.body.pipeThrough(new TransformStream({ flush: restore })), response);
    },
  });
}

const refusal = (e: ApiError) => Response.json(e.body(), { status: e.status });

/** A body over the limit is still read (and dropped) up to 4x the limit or 16 MiB,
 *  whichever is more, before the 413: a client still sending when the answer comes and
 *  the connection closes sees a reset, not the answer. Past it, the 413 comes at once. */
const DRAIN_FACTOR = 4;
const MIN_DRAIN_BYTES = 16 * 1024 * 1024;

/** The whole body, or the error answer when it is over `limit` bytes or the client
 *  stopped sending (then nobody reads the answer). */
async function readBody(request: Request, limit: number): Promise<Uint8Array | Response> {
  const tooLarge = () => refusal(new ApiError(413, `the request body is over the limit of ${limit} bytes`, null, "body_too_large"));
  const drain = Math.max(DRAIN_FACTOR * limit, MIN_DRAIN_BYTES);
  if (Number(request.headers.get("Content-Length") ?? 0) > drain) return tooLarge();
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for await (const chunk of request.body ?? []) {
      size += chunk.byteLength;
      if (size > drain) return tooLarge();
      if (size <= limit) chunks.push(chunk);
    }
    if (size > limit) return tooLarge();
  } catch (e) {
    return refusal(new ApiError(400, `the request body could not be read: ${(e as Error).message}`, null, "body_incomplete"));
  }
  return Buffer.concat(chunks);
}

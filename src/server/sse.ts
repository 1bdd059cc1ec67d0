// Server-sent events for streamed responses: `data: {...}\n\n` per event, `data: [DONE]`
// at the end, an error as one last `data: {"error":...}` event. A client that goes away
// (connection closed, body cancelled) aborts the signal handed to the producer, which
// passes it on to the engine so the request is cancelled and its KV blocks freed.

import { toApiError } from "./errors";

export type SendEvent = (data: unknown) => void;

export function sseResponse(request: Request, produce: (send: SendEvent, signal: AbortSignal) => Promise<void>): Response {
  const gone = new AbortController();
  request.signal.addEventListener("abort", () => gone.abort(), { once: true });
  const encoder = new TextEncoder();
  let out!: ReadableStreamDefaultController<Uint8Array>;
  const body = new ReadableStream<Uint8Array>({
    start: (controller) => void (out = controller),
    cancel: () => gone.abort(),
  });
  const write = (text: string) => {
    if (!gone.signal.aborted) out.enqueue(encoder.encode(text));
  };
  const send: SendEvent = (data) => write(`data: ${JSON.stringify(data)}\n\n`);
  produce(send, gone.signal)
    .then(
      () => write("data: [DONE]\n\n"),
      (e) => send(toApiError(e).body()),
    )
    .finally(() => {
      if (!gone.signal.aborted) out.close();
    });
  return new Response(body, {
    headers: { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", Connection: "keep-alive" },
  });
}

// Server-sent events for streamed responses: `data: {...}\n\n` per event, `data: [DONE]`
// at the end, an error as one last `data: {"error":...}` event. The signal handed to
// the producer aborts when the client goes away (connection closed, body cancelled) or
// the response has ended (an error in one choice stops its siblings); the producer
// passes it on to the engine, which cancels the request and frees its KV blocks.

import { toApiError } from "./errors";

export type SendEvent = (data: unknown) => void;

export function sseResponse(request: Request, produce: (send: SendEvent, signal: AbortSignal) => Promise<void>): Response {
  const over = new AbortController();
  let open = true;
  const clientGone = () => {
    open = false;
    over.abort();
  };
  request.signal.addEventListener("abort", clientGone, { once: true });
  const encoder = new TextEncoder();
  let out!: ReadableStreamDefaultController<Uint8Array>;
  const body = new ReadableStream<Uint8Array>({
    start: (controller) => void (out = controller),
    cancel: clientGone,
  });
  const write = (text: string) => {
    if (open) out.enqueue(encoder.encode(text));
  };
  const send: SendEvent = (data) => write(`data: ${JSON.stringify(data)}\n\n`);
  produce(send, over.signal)
    .then(
      () => write("data: [DONE]\n\n"),
      (e) => send(toApiError(e).body()),
    )
    .finally(() => {
      if (open) out.close();
      open = false;
      over.abort();
    });
  return new Response(body, {
    headers: { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", Connection: "keep-alive" },
  });
}

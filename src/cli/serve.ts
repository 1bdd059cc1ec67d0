import { basename } from "node:path";
import { DEFAULT_MODEL } from "../index";
import { createApp } from "../server/app";
import { listen } from "../server/listen";
import { intFlag, parse, UsageError } from "./args";
import { ENGINE_FLAGS, loadForGeneration, MODEL_FLAGS, SAMPLING_FLAGS } from "./generate";

export const SERVE_HELP = `specinfer serve [--model PATH] [--ssm PATH ...] [--tree SHAPE] [options]

Serves an OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions,
GET /v1/models, /health, /metrics; also without the /v1 prefix). It listens at once
and loads the model in the background: /health answers 503 until it is ready.
Without --model it serves the embedded default pair.

  --model PATH               HF model directory or .gguf file (default: embedded model)
  --ssm PATH                 a draft model (repeatable; default with the embedded model:
                             its draft)
  --tree SHAPE               tree of requests asking for a fixed one ("1,1,3", "dynamic:32")
  --ngram                    also draft by prompt lookup
  --no-spec                  no drafters: plain decoding for every request
  --host HOST                address to bind (default 127.0.0.1)
  --port N                   port (default 8000; 0 picks a free one)
  --api-key KEY              require Authorization: Bearer KEY on every route but
                             /health (default: $SPECINFER_API_KEY, else none)
  --max-seqs N               most requests running at once (default 8)
  --ctx-size N               longest prompt + generation (default: the model's context)
  --batch-size N             most tokens in one forward pass (default 512)
  --max-queue N              most generations waiting beyond the running ones; more get
                             a 429 (default: no limit)
  --served-model-name NAME   the model id clients use (default: the model's file name)
  --kv-dtype f16|f32  --kv-memory BYTES  --threads N  --backend cpu|cuda
  --tp N                     split the model over N devices (tensor parallelism)
  --ssm-device K             draft on device K, overlapped with verification (a Worker
                             with its own threads / GPU stream; unset: between forwards)

Requests choose speculation per request with the extension field "speculation":
false, "auto" (default) or {"tree": "1,1,3", "ngram": true}.
`;

const LOOPBACK = new Set(["127.0.0.1", "localhost", "::1"]);

export async function serveCommand(argv: string[]): Promise<void> {
  const { values } = parse(argv, {
    ...MODEL_FLAGS,
    ...ENGINE_FLAGS,
    ssm: SAMPLING_FLAGS.ssm,
    tree: SAMPLING_FLAGS.tree,
    ngram: SAMPLING_FLAGS.ngram,
    "no-spec": SAMPLING_FLAGS["no-spec"],
    host: { type: "string" },
    port: { type: "string" },
    "api-key": { type: "string" },
    "max-queue": { type: "string" },
    "served-model-name": { type: "string" },
  });
  if (values.help) return void process.stdout.write(SERVE_HELP);
  const host = (values.host as string | undefined) ?? "127.0.0.1";
  const port = intFlag(values, "port", 0, 8000)!;
  if (port > 65535) throw new UsageError(`--port must be at most 65535, got ${port}`);
  const apiKey = (values["api-key"] as string | undefined) ?? (process.env.SPECINFER_API_KEY || undefined);
  const maxSeqs = intFlag(values, "max-seqs", 1, 8)!;
  const maxQueue = intFlag(values, "max-queue", 0);
  const model = values.model as string | undefined;
  if (!apiKey && !LOOPBACK.has(host)) {
    process.stderr.write(`specinfer: warning: serving on ${host} without --api-key: anyone who can reach this port can use the model\n`);
  }

  const loading = loadForGeneration(values);
  const app = createApp(loading, {
    servedModelName: (values["served-model-name"] as string | undefined) ?? basename(model ?? DEFAULT_MODEL).replace(/\.gguf$/, ""),
    apiKey,
    maxInFlight: maxQueue === undefined ? undefined : maxSeqs + maxQueue,
  });
  const server = listen(app, { hostname: host, port });
  process.stderr.write(`specinfer: listening on http://${host}:${server.port}/v1 (loading the model)\n`);

  let llm;
  try {
    llm = await loading;
  } catch (e) {
    server.stop(true);
    throw e;
  }
  process.stderr.write("specinfer: model loaded, ready\n");
  await new Promise<void>((resolve) => {
    process.once("SIGINT", resolve);
    process.once("SIGTERM", resolve);
  });
  server.stop(true);
  await llm.close();
}

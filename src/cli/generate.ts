import { DEFAULT_DRAFT, LLM, type GenerateOptions, type LoadOptions } from "../index";
import { parseTreeShape } from "../speculation/tree";
import { intFlag, numFlag, parse, progressPrinter, UsageError, type Options } from "./args";

export const GENERATE_HELP = `specinfer generate [--model PATH] --prompt TEXT [options]

Generates text, speculating with token trees. Without --model it runs the embedded
default pair (llama-shakespeare-8m verified, llama-shakespeare-1.4m-draft drafting).

  --model PATH            HF model directory or .gguf file (default: embedded model)
  --prompt TEXT           the prompt (required)
  --max-tokens N          most new tokens (default 128)
  --temperature T         0 = greedy (default: the model's generation_config.json,
                          else 0; the embedded model samples at 0.8, top-k 40)
  --top-k K  --top-p P  --min-p P  --repetition-penalty R
  --seed S                sampling seed (default 0)
  --stop TEXT             stop before this text (repeatable)
  --ignore-eos            keep going past end-of-sequence tokens
  --ssm PATH              a draft model (repeatable; default with the embedded model: its draft)
  --tree SHAPE            static widths per depth "1,1,3,1,1" or "dynamic:N"
  --ngram                 also draft by prompt lookup (no model)
  --speculation MODE      auto (default: the tree per step that the measured costs
                          say pays, none included) or fixed (always the --tree shape)
  --no-spec               plain incremental decoding
  --max-seqs N            most requests decoded together (default 8)
  --ctx-size N            longest prompt + generation (default: the model's)
  --batch-size N          most tokens in one forward pass (default 512)
  --kv-dtype f16|f32      KV cache element type (default f16)
  --kv-memory BYTES       bytes for the KV cache (default: --max-seqs full sequences)
  --threads N             CPU threads per device (default: all cores, shared out)
  --backend cpu|cuda      (default cpu)
  --tp N                  split the model over N devices, Megatron style (on the CPU:
                          N contexts with their own threads; default 1)
  --ssm-device K          draft on a device of their own, overlapped with verification
                          (a Worker; CPU: own threads, the cores shared out; CUDA: GPU K,
                          own stream); unset: between the LLM's forwards
  --json                  print one JSON object at the end instead of streaming text
`;

export const MODEL_FLAGS: Options = {
  model: { type: "string" },
  threads: { type: "string" },
  backend: { type: "string" },
  tp: { type: "string" },
  "ssm-device": { type: "string" },
};

export const SAMPLING_FLAGS: Options = {
  "max-tokens": { type: "string" },
  temperature: { type: "string" },
  "top-k": { type: "string" },
  "top-p": { type: "string" },
  "min-p": { type: "string" },
  "repetition-penalty": { type: "string" },
  seed: { type: "string" },
  stop: { type: "string", multiple: true },
  "ignore-eos": { type: "boolean" },
  ssm: { type: "string", multiple: true },
  tree: { type: "string" },
  ngram: { type: "boolean" },
  "no-spec": { type: "boolean" },
  speculation: { type: "string" },
};

export const ENGINE_FLAGS: Options = {
  "max-seqs": { type: "string" },
  "ctx-size": { type: "string" },
  "batch-size": { type: "string" },
  "kv-dtype": { type: "string" },
  "kv-memory": { type: "string" },
};

type Values = Record<string, unknown>;

export function samplingOptions(v: Values): GenerateOptions {
  return {
    maxNewTokens: intFlag(v, "max-tokens", 0),
    temperature: numFlag(v, "temperature", 0, 100),
    topK: intFlag(v, "top-k", 0),
    topP: numFlag(v, "top-p", Number.MIN_VALUE, 1),
    minP: numFlag(v, "min-p", 0, 1),
    repetitionPenalty: numFlag(v, "repetition-penalty", Number.MIN_VALUE, 100),
    seed: intFlag(v, "seed", 0),
    stop: (v.stop as string[] | undefined) ?? [],
    ignoreEos: (v["ignore-eos"] as boolean | undefined) ?? false,
    speculation: speculationFlag(v),
  };
}

function speculationFlag(v: Values): GenerateOptions["speculation"] {
  if (v["no-spec"]) return false;
  const mode = (v.speculation as string | undefined) ?? "auto";
  if (mode === "auto") return "auto";
  if (mode === "fixed") return { tree: v.tree as string | undefined };
  throw new UsageError(`--speculation must be auto or fixed, got "${mode}"`);
}

export function loadOptions(v: Values): LoadOptions {
  const backend = v.backend as string | undefined;
  if (backend !== undefined && backend !== "cpu" && backend !== "cuda") throw new UsageError(`--backend must be cpu or cuda, got "${backend}"`);
  const kvDtype = v["kv-dtype"] as string | undefined;
  if (kvDtype !== undefined && kvDtype !== "f16" && kvDtype !== "f32") throw new UsageError(`--kv-dtype must be f16 or f32, got "${kvDtype}"`);
  return {
    threads: intFlag(v, "threads", 1),
    backend,
    maxRequestsPerBatch: intFlag(v, "max-seqs", 1),
    maxSeqLength: intFlag(v, "ctx-size", 1),
    maxTokensPerBatch: intFlag(v, "batch-size", 1),
    kvDtype,
    kvMemory: intFlag(v, "kv-memory", 1),
    tensorParallel: intFlag(v, "tp", 1),
    ssmDevice: intFlag(v, "ssm-device", 0),
    onProgress: progressPrinter("loading"),
  };
}

/** Loads the LLM with the drafters the flags name (the embedded draft by default). */
export async function loadForGeneration(v: Values): Promise<LLM> {
  const modelGiven = typeof v.model === "string";
  const ngram = (v.ngram as boolean | undefined) ?? false;
  if (v["no-spec"] && (v.ssm || v.tree || ngram)) throw new UsageError("--no-spec cannot be combined with --ssm, --tree or --ngram");
  const ssms = v["no-spec"] ? [] : ((v.ssm as string[] | undefined) ?? (modelGiven ? [] : [DEFAULT_DRAFT]));
  if (v.tree && ssms.length === 0 && !ngram) throw new UsageError("--tree needs a drafter: --ssm PATH or --ngram");
  if (typeof v.tree === "string") {
    try {
      parseTreeShape(v.tree);
    } catch (e) {
      throw new UsageError(`--tree: ${(e as Error).message}`);
    }
  }
  return LLM.load(v.model as string | undefined, { ...loadOptions(v), ssms, tree: v.tree as string | undefined, ngram });
}

export async function generateCommand(argv: string[]): Promise<void> {
  const { values } = parse(argv, { ...MODEL_FLAGS, ...ENGINE_FLAGS, ...SAMPLING_FLAGS, prompt: { type: "string", short: "p" }, json: { type: "boolean" } });
  if (values.help) return void process.stdout.write(GENERATE_HELP);
  if (typeof values.prompt !== "string") throw new UsageError("generate needs --prompt TEXT (see specinfer generate --help)");
  const opts = samplingOptions(values);
  const llm = await loadForGeneration(values);
  try {
    if (values.json) {
      const result = await llm.generate(values.prompt, opts);
      process.stdout.write(JSON.stringify(result) + "\n");
    } else {
      process.stdout.write(values.prompt);
      for await (const piece of llm.stream(values.prompt, opts)) process.stdout.write(piece.text);
      process.stdout.write("\n");
    }
  } finally {
    await llm.close();
  }
}

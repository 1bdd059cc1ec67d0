import { createBackend } from "../backend/index";
import { Engine } from "../engine/engine";
import { BatchBuilder } from "../model/batch";
import { loadLlama } from "../model/llama";
import { idList, intFlag, parse, UsageError } from "./args";
import { loadOptions, MODEL_FLAGS } from "./generate";
import { createKVCache } from "../kv/cache";

export const LOGITS_HELP = `specinfer logits --model PATH --tokens 1,2,3 [--top 20] [--greedy N] [--json]

Debug aid for parity checks against other implementations: feeds raw token ids (no
tokenizer), prints the top logits at the last position and a greedy continuation.
With --json: {"top":[{"id":..,"logit":..},..],"greedy":[ids..]}.
`;

export async function logitsCommand(argv: string[]): Promise<void> {
  const { values } = parse(argv, { ...MODEL_FLAGS, tokens: { type: "string" }, top: { type: "string" }, greedy: { type: "string" }, json: { type: "boolean" } });
  if (values.help) return void process.stdout.write(LOGITS_HELP);
  if (typeof values.model !== "string") throw new UsageError("logits needs --model PATH");
  if (typeof values.tokens !== "string") throw new UsageError("logits needs --tokens 1,2,3");
  const tokens = idList(values.tokens, "tokens");
  const topN = intFlag(values, "top", 1, 20)!;
  const greedyN = intFlag(values, "greedy", 0, 0)!;
  const opts = loadOptions(values);
  const backend = await createBackend(opts);
  const model = loadLlama(values.model, backend, { maxBatchTokens: Math.max(64, tokens.length) });
  try {
    const vocab = model.config.vocabSize;
    const bad = tokens.find((t) => t >= vocab);
    if (bad !== undefined) throw new UsageError(`--tokens: id ${bad} is outside the vocabulary (0..${vocab - 1})`);
    const kv = createKVCache(model, { maxSeqs: 1, maxSeqLen: tokens.length });
    const row = kv.openSequence();
    kv.reserve(row, tokens.length);
    const builder = new BatchBuilder(model.maxWords);
    builder.addChain(row, 0, tokens, 0, "last");
    const logits = model.forward(builder.build(), kv);
    kv.close();
    const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a] || a - b).slice(0, topN);
    const top = order.map((id) => ({ id, logit: logits[id] }));

    let greedy: number[] = [];
    if (greedyN > 0) {
      const engine = new Engine(model, { maxSeqs: 1 });
      const req = engine.submit(tokens, { maxNewTokens: greedyN, temperature: 0, ignoreEos: true });
      engine.runUntilDone(req);
      greedy = req.generated;
      engine.close();
    }
    if (values.json) process.stdout.write(JSON.stringify({ top, greedy }) + "\n");
    else {
      for (const t of top) process.stdout.write(`${String(t.id).padStart(8)}  ${t.logit.toFixed(6)}\n`);
      if (greedyN > 0) process.stdout.write(`greedy: ${greedy.join(",")}\n`);
    }
  } finally {
    model.close();
    backend.close();
  }
}

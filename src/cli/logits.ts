import { createBackend } from "../backend/index";
import { SequenceRunner } from "../kv/sequence";
import { loadModel } from "../model/registry";
import { argmax } from "../speculation/sampling";
import { idList, intFlag, parse, UsageError } from "./args";
import { loadOptions, MODEL_FLAGS } from "./generate";

export const LOGITS_HELP = `specinfer logits --model PATH --tokens 1,2,3 [--top 20] [--greedy N] [--json]

Debug aid for parity checks against other implementations: feeds raw token ids (no
tokenizer), prints the top logits at the last position and a greedy continuation.
With --json: {"top":[{"id":..,"logit":..,"logprob":..},..],"greedy":[ids..]}.
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
  const model = loadModel(values.model, backend, { maxBatchTokens: Math.max(64, tokens.length) });
  try {
    const vocab = model.config.vocabSize;
    const bad = tokens.find((t) => t >= vocab);
    if (bad !== undefined) throw new UsageError(`--tokens: id ${bad} is outside the vocabulary (0..${vocab - 1})`);
    const seq = new SequenceRunner(model, tokens.length + greedyN);
    const logits = seq.feed(tokens, "last").slice();
    // log-softmax in float64: the reference the server's logprobs are checked against.
    const max = logits.reduce((m, x) => Math.max(m, x), -Infinity);
    const logZ = max + Math.log(logits.reduce((s, x) => s + Math.exp(x - max), 0));
    const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a] || a - b).slice(0, topN);
    const top = order.map((id) => ({ id, logit: logits[id], logprob: logits[id] - logZ }));

    // Plain greedy decoding, one token per forward: independent of the engine.
    const greedy: number[] = [];
    let next = argmax(logits);
    for (let i = 0; i < greedyN; i++) {
      greedy.push(next);
      if (i + 1 < greedyN) next = argmax(seq.feed([next], "last"));
    }
    seq.close();
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

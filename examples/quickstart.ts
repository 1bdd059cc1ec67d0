// The README's scripting example, runnable as is: bun examples/quickstart.ts
import { LLM } from "../src/index";

const llm = await LLM.load(); // the embedded default pair, speculating
const out = await llm.generate("ROMEO:\n", { maxNewTokens: 48 });
console.log(out.text);
console.log(`${out.stats.meanAcceptedLength} tokens per LLM pass, ${out.stats.tokensPerSecond} tokens/s`);

for await (const piece of llm.stream("JULIET:\n", { maxNewTokens: 32, temperature: 0.8, seed: 1 })) {
  process.stdout.write(piece.text);
}
process.stdout.write("\n");

const reply = await llm.chat([{ role: "user", content: "Who art thou?" }], { maxNewTokens: 24 });
console.log(reply.text);
await llm.close();

import { createInterface } from "node:readline";
import type { ChatMessage } from "../index";
import { ENGINE_FLAGS, loadForGeneration, MODEL_FLAGS, SAMPLING_FLAGS, samplingOptions } from "./generate";
import { parse } from "./args";

export const CHAT_HELP = `specinfer chat [--model PATH] [--system TEXT] [options]

Interactive chat through the model's chat template (a plain "role: text" layout when
the model has none). One line per turn; an empty line or Ctrl-D ends the chat.
Takes the sampling and speculation options of specinfer generate (--max-tokens,
--temperature, --ssm, --tree, --ngram, --no-spec, ...).
`;

export async function chatCommand(argv: string[]): Promise<void> {
  const { values } = parse(argv, { ...MODEL_FLAGS, ...ENGINE_FLAGS, ...SAMPLING_FLAGS, system: { type: "string" } });
  if (values.help) return void process.stdout.write(CHAT_HELP);
  const opts = samplingOptions(values);
  const llm = await loadForGeneration(values);
  const messages: ChatMessage[] = typeof values.system === "string" ? [{ role: "system", content: values.system }] : [];
  const rl = createInterface({ input: process.stdin, terminal: false });
  const prompt = () => process.stdin.isTTY && process.stdout.write("> ");
  try {
    prompt();
    for await (const line of rl) {
      if (line.trim() === "") break;
      messages.push({ role: "user", content: line });
      let reply = "";
      for await (const piece of llm.stream(llm.chatPrompt(messages), opts)) {
        reply += piece.text;
        process.stdout.write(piece.text);
      }
      process.stdout.write("\n");
      messages.push({ role: "assistant", content: reply });
      prompt();
    }
  } finally {
    rl.close();
    await llm.close();
  }
}

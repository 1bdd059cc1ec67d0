#!/usr/bin/env bun
// specinfer command line: generate, chat, info, logits, serve.

import { UsageError } from "./cli/args";
import { chatCommand } from "./cli/chat";
import { generateCommand } from "./cli/generate";
import { infoCommand } from "./cli/info";
import { logitsCommand } from "./cli/logits";
import { serveCommand } from "./cli/serve";
import { ConfigError } from "./engine/config";
import { ModelFormatError } from "./model/errors";

const HELP = `specinfer: fast LLM inference with token-tree speculative decoding

usage: specinfer <command> [options]   (specinfer <command> --help for details)

  generate   generate text (speculative by default on the embedded model)
  chat       interactive chat with the model's chat template
  info       describe a model file or directory
  logits     top logits and a greedy continuation from raw token ids (parity checks)
  serve      OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)
`;

const COMMANDS: Record<string, (argv: string[]) => Promise<void>> = {
  generate: generateCommand,
  chat: chatCommand,
  info: infoCommand,
  logits: logitsCommand,
  serve: serveCommand,
};

/** Errors that are the caller's to fix (flags, paths, files): exit 2, one line. */
function isUserError(e: unknown): boolean {
  if (e instanceof UsageError || e instanceof ModelFormatError || e instanceof ConfigError) return true;
  const code = (e as NodeJS.ErrnoException)?.code;
  return code === "ENOENT" || code === "EACCES" || code === "EISDIR" || /no such file|does not exist|cannot load/i.test(String((e as Error)?.message));
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    process.stdout.write(HELP);
    return name ? 0 : 2;
  }
  const command = COMMANDS[name];
  if (!command) throw new UsageError(`unknown command "${name}" (commands: ${Object.keys(COMMANDS).join(", ")})`);
  await command(rest);
  return 0;
}

/** A closed stdout (`specinfer generate ... | head`) ends the run quietly, as in other CLIs. */
function isBrokenPipe(e: unknown): boolean {
  return (e as NodeJS.ErrnoException)?.code === "EPIPE";
}
process.stdout.on("error", (e) => {
  if (isBrokenPipe(e)) process.exit(0);
});

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  if (isBrokenPipe(e)) process.exit(0);
  const message = e instanceof Error ? e.message : String(e);
  process.stderr.write(`specinfer: ${message.split("\n")[0]}\n`);
  if (process.env.SPECINFER_DEBUG && e instanceof Error) process.stderr.write(`${e.stack}\n`);
  process.exitCode = isUserError(e) ? 2 : 1;
}

// Shared fixtures for the tokenizer tests: the vendored model and prompt files.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { readGGUF } from "../../src/model/gguf.ts";
import { loadTokenizer } from "../../src/tokenizer/index.ts";

export const MODELS = join(import.meta.dir, "../../models");
export const MODEL_DIR = join(MODELS, "llama-shakespeare-8m");
export const MODEL_GGUF = join(MODEL_DIR, "model.gguf");

export const hfTok = loadTokenizer({ path: MODEL_DIR });
export const tokenizerJson = JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer.json"), "utf8"));
export const tokenizerConfig = JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer_config.json"), "utf8"));

// A real Uint8Array copy: the GGUF reader slices typed arrays with Uint8Array#slice
// semantics, which a Node Buffer (a view) does not have.
const ggufBytes = new Uint8Array(readFileSync(MODEL_GGUF));
export const ggufMetadata = readGGUF({ path: MODEL_GGUF, bytes: ggufBytes, size: ggufBytes.length, ptr: 0, close() {} })
  .metadata;
export const ggufTok = loadTokenizer({ path: MODEL_GGUF });

export const evalPrompts: string[] = readFileSync(join(MODELS, "eval-prompts.jsonl"), "utf8")
  .split("\n")
  .filter((line) => line.trim() !== "")
  .map((line) => JSON.parse(line).prompt);

export const referenceGreedy: { prompt: string; input_ids: number[] }[] = JSON.parse(
  readFileSync(join(MODELS, "reference-greedy.json"), "utf8"),
);

/** Text the vocabulary covers only through byte fallback or unusual whitespace. */
export const EDGE_TEXTS = [
  "emoji 😀🙂 and a family 👨‍👩‍👧 and a flag 🇫🇷",
  "CJK 中文字符 日本語のテキスト 한국어",
  "accents: café naïve résumé, combining e\u0301",
  "double  spaces  and   triple",
  "\ttab\tseparated\t\tfields",
  "   leading spaces",
  "trailing spaces   ",
  " ",
  "  ",
  "line\nbreaks\n\nand\r\nCRLF\n",
  "\n",
  "control \x00\x01\x07\x1b\x7f chars",
  "mixed: ROMEO:\n  Ça va? 😀\t东京\n",
  "",
];

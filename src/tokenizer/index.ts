// Loading a model's tokenizer: tokenizer.json when the model directory has one (it is
// the authoritative, richest description), else the vocabulary inside the GGUF file.

import { existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import type { MappedFile } from "../backend/backend.ts";
import { readGGUF } from "../model/gguf.ts";
import { ggufTokenizer } from "./gguf.ts";
import { loadHFTokenizer } from "./hf.ts";
import type { Tokenizer } from "./tokenizer.ts";

export type { DecodeOptions, EncodeOptions, StreamDecoder, StreamDecoderOptions, Tokenizer } from "./tokenizer.ts";
export { hfTokenizer, loadHFTokenizer } from "./hf.ts";
export { ggufTokenizer } from "./gguf.ts";
export { applyChatTemplate, encodeChat, plainChatPrompt, renderChatTemplate, ChatTemplateError } from "./chat.ts";
export type { ChatMessage, ChatOptions } from "./chat.ts";

export interface LoadTokenizerOptions {
  /** A model directory (tokenizer.json, else its single *.gguf file) or a .gguf file. */
  path: string;
  /** Metadata of the model's GGUF file when the caller has already read it; used
   *  instead of reading the file again when there is no tokenizer.json. */
  ggufMetadata?: Map<string, unknown>;
}

export function loadTokenizer(opts: LoadTokenizerOptions): Tokenizer {
  const { path } = opts;
  if (!existsSync(path)) throw new Error(`cannot load a tokenizer: ${path} does not exist`);
  const isDir = statSync(path).isDirectory();
  if (isDir && existsSync(join(path, "tokenizer.json"))) return loadHFTokenizer(path);
  if (opts.ggufMetadata) return ggufTokenizer(opts.ggufMetadata, path);
  if (!isDir) return ggufTokenizer(readGGUFMetadata(path), path);

  const ggufs = readdirSync(path).filter((f) => f.endsWith(".gguf")).sort();
  if (ggufs.length === 0) throw new Error(`cannot load a tokenizer: ${path} has neither tokenizer.json nor a .gguf file`);
  if (ggufs.length > 1) {
    throw new Error(`cannot load a tokenizer: ${path} has several .gguf files (${ggufs.join(", ")}); pass one as path`);
  }
  const file = join(path, ggufs[0]);
  return ggufTokenizer(readGGUFMetadata(file), file);
}

/** Reads only what the GGUF header needs: the file is mapped (pages are read on
 *  touch), so a multi-gigabyte model costs no copy. */
function readGGUFMetadata(path: string): Map<string, unknown> {
  let bytes: Uint8Array;
  try {
    // mmap refuses empty files; the GGUF reader explains those better.
    bytes = statSync(path).size === 0 ? new Uint8Array(0) : Bun.mmap(path, { shared: false });
  } catch (e) {
    throw new Error(`cannot read ${path}: ${(e as Error).message}`);
  }
  const file: MappedFile = { path, size: bytes.byteLength, bytes, ptr: 0, close() {} };
  return readGGUF(file).metadata;
}

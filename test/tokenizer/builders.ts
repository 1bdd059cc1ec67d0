// Test tokenizers built here, each loaded both ways from one vocabulary: as GGUF
// metadata written by our GGUF writer and read back by our reader (tokenizer/gguf.ts),
// and as a tokenizer.json run by @huggingface/tokenizers (tokenizer/hf.ts).

import { readGGUF } from "../../src/model/gguf.ts";
import { encodeGGUF, gguf, ggufTokenizerMetadata, type GGUFMetadata } from "../../src/model/write.ts";
import { byteToUnicode, ggufTokenizer, TokenType } from "../../src/tokenizer/gguf.ts";
import { hfTokenizer, type HFTokenizerConfig } from "../../src/tokenizer/hf.ts";
import type { Tokenizer } from "../../src/tokenizer/index.ts";
import { ggufMetadata, tokenizerConfig, tokenizerJson } from "./helpers.ts";

export interface TokenizerPair {
  gguf: Tokenizer;
  hf: Tokenizer;
}

/** Metadata as a reader sees it after our writer put it in a GGUF file. */
export function throughGGUFFile(metadata: GGUFMetadata): Map<string, unknown> {
  const bytes = encodeGGUF(metadata, []);
  return readGGUF({ path: "test.gguf", bytes, size: bytes.byteLength, ptr: 0, close() {} }).metadata;
}

// --- SentencePiece: the vendored Llama-2-format vocabulary, plus a U+FEFF token -------

export const BOM = "\uFEFF";

/** The vendored 4096-token SentencePiece vocabulary with U+FEFF appended as a normal
 *  token (Llama 2's vocabulary has one), so "a\uFEFFb" needs no byte fallback. */
export function sentencePiecePair(config: HFTokenizerConfig = tokenizerConfig): TokenizerPair & { bomId: number } {
  const tokens = [...(ggufMetadata.get("tokenizer.ggml.tokens") as string[]), BOM];
  const bomId = tokens.length - 1;
  const metadata = {
    ...ggufTokenizerMetadata(ggufMetadata),
    "tokenizer.ggml.tokens": gguf.strings(tokens),
    "tokenizer.ggml.scores": gguf.f32s([...(ggufMetadata.get("tokenizer.ggml.scores") as Float32Array), -1000]),
    "tokenizer.ggml.token_type": gguf.i32s([...(ggufMetadata.get("tokenizer.ggml.token_type") as Int32Array), TokenType.Normal]),
  };
  const json = structuredClone(tokenizerJson);
  json.model.vocab[BOM] = bomId;
  return {
    gguf: ggufTokenizer(throughGGUFFile(metadata), "sentencepiece.gguf"),
    hf: hfTokenizer(json, config),
    bomId,
  };
}

// --- byte-level BPE: a small vocabulary with merges trained here ----------------------

export const EOT = "<|endoftext|>";
/** A user-defined (not special) added token: matched in text even with parseSpecial off. */
export const TOOL = "<tool>";

const TRAINING_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
// The pre-tokenizer patterns as tokenizer.json files write them (Oniguruma syntax,
// translated by the library).
const HF_PATTERNS = {
  "gpt-2": "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
  "llama-bpe":
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};
export type BytePre = keyof typeof HF_PATTERNS;

const CORPUS = `The quick brown fox jumps over the lazy dog. The dog's bark isn't loud; they're
quiet dogs and we've seen them. I'll say the the the 12345 6789 thereafter then there.
Café naïve résumé — 東京 北京 😀😀 🙂!!! ... --- I'm here, aren't you? function f(x) { return x; }`;

export const BYTE_CHARS = byteToUnicode();
export const toByteChars = (s: string) => Array.from(new TextEncoder().encode(s), (b) => BYTE_CHARS[b]).join("");

/** Learns `count` merges greedily (most frequent adjacent pair, ties by text order). */
function trainMerges(corpus: string, count: number): string[][] {
  const words = (corpus.match(TRAINING_SPLIT) ?? []).map((w) => Array.from(toByteChars(w)));
  const merges: string[][] = [];
  for (let m = 0; m < count; m++) {
    const freq = new Map<string, number>();
    for (const w of words) for (let i = 0; i + 1 < w.length; i++) {
      const key = `${w[i]} ${w[i + 1]}`;
      freq.set(key, (freq.get(key) ?? 0) + 1);
    }
    const best = [...freq].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))[0];
    if (!best) break;
    const [left, right] = best[0].split(" ");
    merges.push([left, right]);
    for (const w of words) for (let i = 0; i + 1 < w.length; i++) {
      if (w[i] === left && w[i + 1] === right) w.splice(i, 2, left + right);
    }
  }
  return merges;
}

/** Byte-level BPE as GGUF (`tokenizer.ggml.pre` = `ggufPre`, a name llama.cpp writes for
 *  that split) and as tokenizer.json. `config` overrides tokenizer_config.json keys, e.g.
 *  clean_up_tokenization_spaces. Whole words with no merge path (" zebra", "Zebra") are
 *  reachable only where merges are skipped (Llama-3). */
export function byteLevelPair(pre: BytePre, config: HFTokenizerConfig = {}, ggufPre: string = pre) {
  const merges = trainMerges(CORPUS, 100);
  const tokens = [...BYTE_CHARS];
  for (const [l, r] of merges) if (!tokens.includes(l + r)) tokens.push(l + r);
  for (const w of [" zebra", "Zebra"]) tokens.push(toByteChars(w));
  tokens.push(EOT, TOOL);
  const eotId = tokens.length - 2;
  const toolId = tokens.length - 1;
  const types = tokens.map((_, i) => (i === eotId ? TokenType.Control : i === toolId ? TokenType.UserDefined : TokenType.Normal));
  const metadata = throughGGUFFile({
    "tokenizer.ggml.model": gguf.str("gpt2"),
    "tokenizer.ggml.pre": gguf.str(ggufPre),
    "tokenizer.ggml.tokens": gguf.strings(tokens),
    "tokenizer.ggml.token_type": gguf.i32s(types),
    "tokenizer.ggml.merges": gguf.strings(merges.map((m) => m.join(" "))),
    "tokenizer.ggml.bos_token_id": gguf.u32(eotId),
    "tokenizer.ggml.eos_token_id": gguf.u32(eotId),
    "tokenizer.ggml.add_bos_token": gguf.bool(false),
  });
  const added = (id: number, content: string, special: boolean) => ({
    id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special,
  });
  const json = {
    version: "1.0",
    added_tokens: [added(eotId, EOT, true), added(toolId, TOOL, false)],
    normalizer: null,
    pre_tokenizer: {
      type: "Sequence",
      pretokenizers: [
        { type: "Split", pattern: { Regex: HF_PATTERNS[pre] }, behavior: "Isolated", invert: false },
        { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    post_processor: null,
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: pre === "llama-bpe",
      vocab: Object.fromEntries(tokens.slice(0, eotId).map((t, i) => [t, i])),
      merges: merges.map((m) => m.join(" ")),
    },
  };
  const hfConfig = { bos_token: EOT, eos_token: EOT, add_bos_token: false, clean_up_tokenization_spaces: false, ...config };
  return {
    gguf: ggufTokenizer(metadata, `${ggufPre}.gguf`),
    hf: hfTokenizer(json, hfConfig),
    json,
    eotId,
    toolId,
  };
}

/** Strings that exercise pre-tokenizers and byte handling. */
export const HARD_TEXTS = [
  "The quick brown fox jumps over the lazy dog.",
  "they're quiet; I'll say it's THE dog's and WE'VE seen 1234567 then. I 'm here , aren 't you ?",
  "  leading spaces, trailing spaces   ",
  "runs of spaces:  two   three    four     five",
  "tabs\tand\t\ttabs \t mixed\t \n",
  "newlines\n\n\nthree and\r\n\r\nCRLF\n \n",
  "digits 0 12 345 6789 1234567890 3.14159 1,000,000 ١٢٣ ½",
  "apostrophes: ' '' 's 'S 'll 'LL ' s ’ curly’s",
  "CJK 中文字符 日本語のテキスト 한국어 東京",
  "emoji 😀😁 ? 👨‍👩‍👧 🇫🇷 and combining e\u0301",
  "code: function f(x) {\n\treturn x * 2; // comment\n}\n    if (a && b) { print(\"hi\") }",
  `${BOM}leading byte-order mark`,
  `a${BOM}b ${BOM} ${BOM}. x${BOM}${BOM}`,
  "a zebra and Zebra zebras",
  "control \x00\x01\x1b[0m\x7f chars and NEL\u0085here\u00a0nbsp\u3000ideographic space",
  `specials written in text: ${EOT} <s> </s> <unk> ${TOOL}x`,
  "",
  " ",
  "\n",
];

// Byte-level BPE from GGUF metadata (our implementation) against @huggingface/tokenizers
// fed the equivalent tokenizer.json, on a tiny vocabulary trained here.

import { describe, expect, test } from "bun:test";
import { byteToUnicode, ggufTokenizer, TokenType } from "../../src/tokenizer/gguf.ts";
import { hfTokenizer } from "../../src/tokenizer/hf.ts";

const GPT2_REGEX = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
// Llama-3's pattern as written in its tokenizer.json (Oniguruma syntax, translated by the library).
const LLAMA3_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const CORPUS = `The quick brown fox jumps over the lazy dog. The dog's bark isn't loud; they're
quiet dogs and we've seen them. I'll say the the the 12345 6789 thereafter then there.
Café naïve résumé — 東京 北京 😀😀 🙂!!! ... ---`;

const BYTE_CHARS = byteToUnicode();
const toByteChars = (s: string) => Array.from(new TextEncoder().encode(s), (b) => BYTE_CHARS[b]).join("");

/** Learns `count` merges greedily (most frequent adjacent pair, ties by text order). */
function trainMerges(corpus: string, count: number): string[][] {
  const words = (corpus.match(GPT2_REGEX) ?? []).map((w) => Array.from(toByteChars(w)));
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

const EOT = "<|endoftext|>";

function buildVocab(extraWholeWords: string[]) {
  const merges = trainMerges(CORPUS, 80);
  const tokens = [...BYTE_CHARS];
  for (const [l, r] of merges) if (!tokens.includes(l + r)) tokens.push(l + r);
  // Whole words with no merge path: only reachable when merges are skipped (Llama-3).
  for (const w of extraWholeWords) tokens.push(toByteChars(w));
  tokens.push(EOT);
  return { tokens, merges, eotId: tokens.length - 1 };
}

function pair(pre: "gpt2" | "llama-bpe") {
  const { tokens, merges, eotId } = buildVocab([" zebra", "Zebra"]);
  const metadata = new Map<string, unknown>([
    ["tokenizer.ggml.model", "gpt2"],
    ["tokenizer.ggml.pre", pre],
    ["tokenizer.ggml.tokens", tokens],
    ["tokenizer.ggml.token_type", Int32Array.from(tokens, (_, i) => (i === eotId ? TokenType.Control : TokenType.Normal))],
    ["tokenizer.ggml.merges", merges.map((m) => m.join(" "))],
    ["tokenizer.ggml.bos_token_id", eotId],
    ["tokenizer.ggml.eos_token_id", eotId],
  ]);
  const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: pre === "gpt2" };
  const json = {
    version: "1.0",
    added_tokens: [{ id: eotId, content: EOT, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    normalizer: null,
    pre_tokenizer:
      pre === "gpt2"
        ? byteLevel
        : {
            type: "Sequence",
            pretokenizers: [{ type: "Split", pattern: { Regex: LLAMA3_PATTERN }, behavior: "Isolated", invert: false }, byteLevel],
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
      vocab: Object.fromEntries(tokens.map((t, i) => [t, i])),
      merges: merges.map((m) => m.join(" ")),
    },
  };
  const config = { bos_token: EOT, eos_token: EOT, add_bos_token: false, clean_up_tokenization_spaces: false };
  return { ours: ggufTokenizer(metadata, "test gpt2 vocab"), reference: hfTokenizer(json, config), eotId };
}

const TEXTS = [
  "The quick brown fox jumps over the lazy dog.",
  "they're quiet; I'll say it's THE dog's and WE'VE seen 1234567 then.",
  "  leading spaces, trailing spaces   ",
  "tabs\tand\t\tnewlines\n\n\r\nend\n",
  "Café naïve résumé — 東京 北京 😀😀 🙂!!! ... ---",
  "ZWJ 👨‍👩‍👧 flag 🇫🇷 combining e\u0301",
  "control \x00\x01\x1b[0m\x7f chars",
  "a zebra and Zebra zebras",
  `before${EOT}after ${EOT}`,
  "",
  " ",
];

for (const pre of ["gpt2", "llama-bpe"] as const) {
  describe(`byte-level BPE, pre-tokenizer ${pre}`, () => {
    const { ours, reference, eotId } = pair(pre);

    test("encodes like @huggingface/tokenizers", () => {
      for (const text of TEXTS) expect({ text, ids: ours.encode(text) }).toEqual({ text, ids: reference.encode(text) });
      // The merges really are exercised: far fewer tokens than bytes.
      const sentence = TEXTS[0];
      expect(ours.encode(sentence).length).toBeLessThan(new TextEncoder().encode(sentence).length / 2);
    });

    test("decodes like @huggingface/tokenizers and round-trips", () => {
      for (const text of TEXTS) {
        const ids = ours.encode(text);
        expect(ours.decode(ids, { skipSpecial: false })).toBe(reference.decode(ids, { skipSpecial: false }));
        expect(ours.decode(ids, { skipSpecial: false })).toBe(text);
        expect(ours.decode(ids)).toBe(reference.decode(ids));
      }
    });

    test("the end-of-text token is special and ends generation", () => {
      expect(ours.encode(EOT)).toEqual([eotId]);
      expect(ours.isSpecial(eotId)).toBe(true);
      expect(ours.eosIds).toEqual([eotId]);
      expect(ours.encode("x", { addSpecial: true })).toEqual(ours.encode("x", { addSpecial: false }));
    });
  });
}

test("whole-word vocabulary hits skip merging only for llama-bpe", () => {
  const zebra = toByteChars(" zebra");
  const llama3 = pair("llama-bpe").ours;
  const gpt2 = pair("gpt2").ours;
  expect(llama3.encode(" zebra").map((id) => llama3.idToToken(id))).toEqual([zebra]);
  expect(gpt2.encode(" zebra").length).toBeGreaterThan(1);
});

test("an unsupported pre-tokenizer is refused by name", () => {
  const metadata = new Map<string, unknown>([
    ["tokenizer.ggml.model", "gpt2"],
    ["tokenizer.ggml.pre", "qwen2"],
    ["tokenizer.ggml.tokens", ["a"]],
    ["tokenizer.ggml.merges", []],
  ]);
  expect(() => ggufTokenizer(metadata, "m.gguf")).toThrow(/m\.gguf: tokenizer\.ggml\.pre = "qwen2" is not supported/);
});

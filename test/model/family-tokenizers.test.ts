// Byte-level BPE tokenizers of the new families: one vocabulary and merge list written
// as tokenizer.json (with the family's Hugging Face pre-tokenizer, run by
// @huggingface/tokenizers) and as GGUF metadata (with the `tokenizer.ggml.pre` name
// llama.cpp's converter writes for it, run by our splitter) give the same ids on hard
// strings: runs of spaces and tabs, digits, apostrophes, CJK, emoji, code.

import { describe, expect, test } from "bun:test";
import { hfTokenizer } from "../../src/tokenizer/hf.ts";
import { byteLevelPair, HARD_TEXTS } from "../tokenizer/builders.ts";

const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };

/** The pre_tokenizer of each family's tokenizer.json, and the GGUF pre name. */
const FAMILIES: [string, string, unknown][] = [
  // MPT uses the GPT-NeoX tokenizer: the byte-level split alone.
  ["MPT (GPT-NeoX)", "mpt", byteLevel],
  // StarCoder: every digit on its own, then the byte-level split.
  ["StarCoder", "starcoder", { type: "Sequence", pretokenizers: [{ type: "Digits", individual_digits: true }, byteLevel] }],
  // Falcon: punctuation runs, the byte-level split, digit runs, then groups of three digits.
  ["Falcon", "falcon", {
    type: "Sequence",
    pretokenizers: [
      { type: "Punctuation", behavior: "Contiguous" },
      byteLevel,
      { type: "Digits", individual_digits: false },
      { type: "Split", pattern: { Regex: "[0-9][0-9][0-9]" }, behavior: "Isolated", invert: false },
    ],
  }],
];

describe("GGUF and tokenizer.json forms of a family's tokenizer agree", () => {
  for (const [family, pre, preTokenizer] of FAMILIES) {
    test(`${family}: tokenizer.ggml.pre = ${pre} encodes hard strings to the ids tokenizer.json gives`, () => {
      const pair = byteLevelPair("gpt-2", {}, pre);
      const hf = hfTokenizer({ ...pair.json, pre_tokenizer: preTokenizer }, { bos_token: "<|endoftext|>", eos_token: "<|endoftext|>", add_bos_token: false, clean_up_tokenization_spaces: false });
      for (const text of HARD_TEXTS) {
        expect({ text, ids: pair.gguf.encode(text, { parseSpecial: false }) }).toEqual({ text, ids: hf.encode(text, { parseSpecial: false }) });
      }
      // Not vacuous: apart from MPT's (which is GPT-2's), the family's split changes ids.
      const gpt2 = byteLevelPair("gpt-2").gguf;
      const differs = HARD_TEXTS.some((t) => JSON.stringify(gpt2.encode(t)) !== JSON.stringify(pair.gguf.encode(t)));
      expect(differs).toBe(pre !== "mpt");
    });
  }
});

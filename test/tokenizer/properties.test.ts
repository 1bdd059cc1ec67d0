// Properties of every test tokenizer: any id sequence cut into pieces of any sizes
// (inside multi-byte characters and clean-up patterns included) and streamed after any
// prefix gives exactly the whole decode; decode(encode(text)) is the text; and GGUF
// metadata encodes like the tokenizer.json of the same vocabulary. Seeded; a failure
// names the seed to rerun (FC_SEED=<seed> bun test ...).

import { expect, test } from "bun:test";
import fc from "fast-check";
import type { Tokenizer } from "../../src/tokenizer/index.ts";
import { BOM, byteLevelPair, EOT, HARD_TEXTS, sentencePiecePair, TOOL, type TokenizerPair } from "./builders.ts";
import { tokenizerConfig } from "./helpers.ts";

const SEED = Number(process.env.FC_SEED ?? 20261203);
const RUNS = 300;

const withCleanup = { clean_up_tokenization_spaces: true };
const sentencePiece = sentencePiecePair();
const gpt2 = byteLevelPair("gpt-2");
const llama3 = byteLevelPair("llama-bpe");
const TOKENIZERS: [string, Tokenizer][] = [
  ["SentencePiece GGUF", sentencePiece.gguf],
  ["SentencePiece tokenizer.json", sentencePiece.hf],
  ["SentencePiece tokenizer.json, clean-up set", sentencePiecePair({ ...tokenizerConfig, ...withCleanup }).hf],
  ["byte-level gpt-2 GGUF", gpt2.gguf],
  ["byte-level gpt-2 tokenizer.json", gpt2.hf],
  ["byte-level llama-bpe GGUF", llama3.gguf],
  ["byte-level llama-bpe tokenizer.json", llama3.hf],
  ["byte-level llama-bpe tokenizer.json, clean-up set (Llama-3-like)", byteLevelPair("llama-bpe", withCleanup).hf],
];

// Characters that make hard cuts: clean-up patterns, multi-byte characters, BOM.
const TRICKY = [
  " ", " ", "'", "m", "s", "n't", "'LL", "?", ".", ",", "!", "$", "😁", "中", "é", "e\u0301", BOM, "\n", "\r", "\t",
  "\u0085", "\u00a0", "\u3000", "1", "23", "x", "Zebra", " zebra", "<s>", EOT, TOOL,
];

/** Text of any code points; surrogates, which text cannot hold alone, move below U+0800.
 *  (fast-check's "binary" strings cost seconds to set up.) */
const codePointsToText = (cps: number[]) =>
  String.fromCodePoint(...cps.map((cp) => (cp >= 0xd800 && cp <= 0xdfff ? cp - 0xd800 : cp)));

const texts: fc.Arbitrary<string> = fc.oneof(
  fc.array(fc.constantFrom(...TRICKY), { maxLength: 10 }).map((parts) => parts.join("")),
  fc.array(fc.integer({ min: 0, max: 0x10ffff }), { maxLength: 8 }).map(codePointsToText),
  fc.constantFrom(...HARD_TEXTS),
);

function idSequences(tok: Tokenizer): fc.Arbitrary<number[]> {
  const segment = fc.oneof(
    fc.array(fc.integer({ min: 0, max: tok.vocabSize - 1 }), { minLength: 1, maxLength: 6 }),
    texts.map((text) => tok.encode(text, { addSpecial: false })),
  );
  return fc.array(segment, { maxLength: 5 }).map((segments) => segments.flat());
}

function check(name: string, property: fc.IProperty<any>): void {
  try {
    fc.assert(property, { seed: SEED, numRuns: RUNS });
  } catch (e) {
    console.error(`property failed for ${name}; rerun with FC_SEED=${SEED}`);
    throw e;
  }
}

/** Streams `ids` after `prefix`, pushing them in pieces of the given sizes (cycled). */
function streamInPieces(tok: Tokenizer, prefix: number[], ids: number[], sizes: number[], skipSpecial: boolean) {
  const decoder = tok.createStreamDecoder({ prefix, skipSpecial });
  const out: string[] = [];
  for (let at = 0, k = 0; at < ids.length; k++) {
    const size = sizes[k % sizes.length];
    out.push(decoder.push(...ids.slice(at, at + size)));
    at += size;
  }
  return { pieces: out, tail: decoder.flush() };
}

for (const [name, tok] of TOKENIZERS) {
  test(`${name}: streamed text equals the whole decode for every cut and prefix`, () => {
    const property = fc.property(
      idSequences(tok),
      fc.array(fc.integer({ min: 1, max: 5 }), { minLength: 1, maxLength: 8 }),
      fc.nat(),
      fc.boolean(),
      (all, sizes, cut, skipSpecial) => {
        const split = cut % (all.length + 1);
        const prefix = all.slice(0, split);
        const ids = all.slice(split);
        const whole = tok.decode(all, { skipSpecial });
        // What the prefix showed: its text up to its last complete character.
        const shown = tok.decode(prefix, { skipSpecial }).replace(/\uFFFD+$/, "");
        expect(whole.startsWith(shown)).toBe(true);
        const { pieces, tail } = streamInPieces(tok, prefix, ids, sizes, skipSpecial);
        expect(pieces.join("") + tail).toBe(whole.slice(shown.length));
        // Nothing is emitted while a character may still be incomplete.
        for (const piece of pieces) expect(piece.endsWith("\uFFFD")).toBe(false);
      },
    );
    check(name, property);
  });
}

for (const [name, tok] of TOKENIZERS) {
  test(`${name}: decode(encode(text)) is the text, special-token names included`, () => {
    const property = fc.property(texts, fc.array(texts, { maxLength: 3 }), (text, more) => {
      const all = [text, ...more].join("");
      expect(tok.decode(tok.encode(all, { parseSpecial: false }))).toBe(all);
    });
    check(name, property);
  });
}

const PAIRS: [string, TokenizerPair][] = [
  ["SentencePiece", sentencePiece],
  ["byte-level gpt-2", gpt2],
  ["byte-level llama-bpe", llama3],
];

for (const [name, pair] of PAIRS) {
  test(`${name}: GGUF metadata encodes any text like tokenizer.json, special-token matching on or off`, () => {
    const property = fc.property(texts, fc.boolean(), (text, parseSpecial) => {
      expect(pair.gguf.encode(text, { parseSpecial })).toEqual(pair.hf.encode(text, { parseSpecial }));
    });
    check(name, property);
  });
}

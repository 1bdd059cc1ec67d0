// The streaming decoder: its pieces add up to decode(), and it never emits half a
// UTF-8 character (U+FFFD) while bytes are still arriving.

import { describe, expect, test } from "bun:test";
import type { StreamDecoderOptions, Tokenizer } from "../../src/tokenizer/index.ts";
import { byteLevelPair, sentencePiecePair } from "./builders.ts";
import { EDGE_TEXTS, evalPrompts, ggufTok, hfTok, tokenizerConfig } from "./helpers.ts";

function stream(tok: Tokenizer, ids: number[], opts: StreamDecoderOptions = {}) {
  const decoder = tok.createStreamDecoder(opts);
  const pieces = ids.map((id) => decoder.push(id));
  return { pieces, tail: decoder.flush() };
}

const TOKENIZERS = [
  ["gguf", ggufTok],
  ["tokenizer.json", hfTok],
] as const;

for (const [name, tok] of TOKENIZERS) {
  test(`${name}: pushes + flush == decode, with and without special tokens`, () => {
    for (const text of [...EDGE_TEXTS, ...evalPrompts.slice(0, 40)]) {
      const ids = [...tok.encode(text), ...tok.eosIds];
      for (const skipSpecial of [true, false]) {
        const { pieces, tail } = stream(tok, ids, { skipSpecial });
        expect(pieces.join("") + tail).toBe(tok.decode(ids, { skipSpecial }));
      }
    }
  });

  test(`${name}: multi-byte characters are never emitted half`, () => {
    for (const text of EDGE_TEXTS) {
      const { pieces, tail } = stream(tok, tok.encode(text));
      for (const piece of pieces) expect(piece).not.toContain("\uFFFD");
      // Valid text is emitted as soon as each character is complete.
      expect(tail).toBe("");
    }
    // 😀 is four byte tokens: nothing comes out until the last one.
    const { pieces } = stream(tok, tok.encode("😀", { addSpecial: false }));
    expect(pieces).toEqual(["", "", "", "", "😀"]);
  });

  test(`${name}: the leading space is stripped once, at the start of the stream`, () => {
    const ids = tok.encode("to be or not", { addSpecial: false });
    const { pieces } = stream(tok, ids);
    expect(pieces[0]).toBe("to");
    expect(pieces.slice(1).every((p) => p.startsWith(" "))).toBe(true);
  });

  test(`${name}: a prefix (the prompt) gives context and is not re-emitted`, () => {
    const prompt = tok.encode("ROMEO:\nBut soft, what light");
    const output = tok.encode(" through yonder 窗 breaks", { addSpecial: false });
    // Split the prompt/output boundary inside a character too.
    const cjk = tok.encode("中", { addSpecial: false });
    for (const [before, after] of [[prompt, output], [[...prompt, ...cjk.slice(0, 2)], cjk.slice(2)]]) {
      const { pieces, tail } = stream(tok, after, { prefix: before });
      const all = tok.decode([...before, ...after]);
      // What the prompt showed: its text up to its last complete character.
      const shown = tok.decode(before).replace(/\uFFFD+$/, "");
      expect(pieces.join("") + tail).toBe(all.slice(shown.length));
      expect(pieces.join("")).not.toContain("\uFFFD");
    }
  });

  test(`${name}: an unfinished character at the end comes out of flush as U+FFFD`, () => {
    const cjk = tok.encode("中", { addSpecial: false });
    const { pieces, tail } = stream(tok, cjk.slice(0, -1));
    expect(pieces.join("")).toBe("");
    expect(tail).toBe(tok.decode(cjk.slice(0, -1)));
    expect(tail).toContain("\uFFFD");
  });
}

// Texts where clean_up_tokenization_spaces would delete a space the text has.
const CLEANUP_TEXTS = ["I 'm here", "😁 ?", "a , b . c ! d ?", "do n't", "it 's", "we 've", "they 're", "' quoted ' x"];

describe("tokenizer.json configs that set clean_up_tokenization_spaces: true", () => {
  const llama3Like = byteLevelPair("llama-bpe", { clean_up_tokenization_spaces: true }).hf;
  const { hf: llama2Like } = sentencePiecePair({ ...tokenizerConfig, clean_up_tokenization_spaces: true });

  for (const [name, tok] of [["Llama-3-like", llama3Like], ["Llama-2-like", llama2Like]] as const) {
    test(`${name}: streaming "I 'm here" one token at a time gives the whole decode, which is the text`, () => {
      const ids = tok.encode("I 'm here", { addSpecial: false });
      expect(ids.length).toBeGreaterThan(3);
      const { pieces, tail } = stream(tok, ids);
      expect(pieces.join("") + tail).toBe(tok.decode(ids));
      expect(tok.decode(ids)).toBe("I 'm here");
    });

    test(`${name}: decode(encode(s)) == s where the clean-up would delete spaces`, () => {
      for (const text of CLEANUP_TEXTS) expect(tok.decode(tok.encode(text))).toBe(text);
    });
  }
});

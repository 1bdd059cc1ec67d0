// The GGUF SentencePiece implementation against tokenizer.json (@huggingface/tokenizers)
// and against SentencePiece's own ids (reference-greedy.json).

import { describe, expect, test } from "bun:test";
import { ggufTokenizer, hfTokenizer } from "../../src/tokenizer/index.ts";
import {
  EDGE_TEXTS,
  evalPrompts,
  ggufMetadata,
  ggufTok,
  hfTok,
  referenceGreedy,
  tokenizerConfig,
  tokenizerJson,
} from "./helpers.ts";
import { BOM, HARD_TEXTS, sentencePiecePair } from "./builders.ts";
import { encodeGGUF, gguf } from "../../src/model/write.ts";
import { readGGUF } from "../../src/model/gguf.ts";

test("the fixtures are what the tests assume", () => {
  expect(evalPrompts.length).toBe(160);
  expect(referenceGreedy.length).toBe(12);
});

test("both tokenizers describe the same vocabulary", () => {
  for (const tok of [hfTok, ggufTok]) {
    expect(tok.vocabSize).toBe(4096);
    expect(tok.bosId).toBe(1);
    expect(tok.eosIds).toEqual([2]);
    expect([0, 1, 2].map((id) => tok.isSpecial(id))).toEqual([true, true, true]);
    expect(tok.isSpecial(3)).toBe(false); // <0x00>
    expect(tok.idToToken(13)).toBe("<0x0A>");
  }
  for (let id = 0; id < 4096; id++) expect(ggufTok.idToToken(id)).toBe(hfTok.idToToken(id)!);
});

test("GGUF and tokenizer.json give identical ids on every eval prompt", () => {
  for (const prompt of evalPrompts) {
    expect({ prompt, ids: ggufTok.encode(prompt) }).toEqual({ prompt, ids: hfTok.encode(prompt) });
  }
});

test("GGUF and tokenizer.json give identical ids on emoji, CJK, whitespace and control text", () => {
  const literalSpecials = ["Hello<s>world", "a</s>", "<unk>x", "<s>"];
  for (const text of [...EDGE_TEXTS, ...literalSpecials]) {
    for (const addSpecial of [true, false]) {
      expect({ text, ids: ggufTok.encode(text, { addSpecial }) }).toEqual({ text, ids: hfTok.encode(text, { addSpecial }) });
    }
  }
});

test("both match SentencePiece's ids for the reference prompts", () => {
  for (const { prompt, input_ids } of referenceGreedy) {
    expect(hfTok.encode(prompt)).toEqual(input_ids);
    expect(ggufTok.encode(prompt)).toEqual(input_ids);
  }
});

test("BOS follows addSpecial; the dummy-prefix space is added once per text run", () => {
  const ids = ggufTok.encode("ROMEO:");
  expect(ids[0]).toBe(1);
  expect(ggufTok.encode("ROMEO:", { addSpecial: false })).toEqual(ids.slice(1));
  expect(ggufTok.encode("")).toEqual([1]);
  expect(ggufTok.idToToken(ggufTok.encode("the", { addSpecial: false })[0])!.startsWith("\u2581")).toBe(true);
  // Byte fallback: a character outside the vocabulary becomes its UTF-8 byte tokens.
  const emoji = ggufTok.encode("😀", { addSpecial: false }).map((id) => ggufTok.idToToken(id));
  expect(emoji).toEqual(["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]);
});

test("decode(encode(x)) == x", () => {
  for (const text of [...evalPrompts, ...EDGE_TEXTS]) {
    for (const tok of [ggufTok, hfTok]) expect(tok.decode(tok.encode(text))).toBe(text);
  }
});

test("GGUF decode equals tokenizer.json decode, with and without special tokens", () => {
  // A fixed pseudo-random mix of ordinary, byte (often invalid UTF-8) and special ids.
  let seed = 12345;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  for (let trial = 0; trial < 200; trial++) {
    const ids = Array.from({ length: 1 + Math.floor(next() * 24) }, () =>
      next() < 0.4 ? Math.floor(next() * 259) : Math.floor(next() * 4096),
    );
    for (const skipSpecial of [true, false]) {
      expect(ggufTok.decode(ids, { skipSpecial })).toBe(hfTok.decode(ids, { skipSpecial }));
    }
  }
  expect(ggufTok.decode([1, 2, 0], { skipSpecial: false })).toBe("<s></s><unk>");
  expect(ggufTok.decode([])).toBe("");
  expect(hfTok.decode([])).toBe("");
});

test("decode refuses ids outside the vocabulary", () => {
  for (const tok of [ggufTok, hfTok]) {
    expect(() => tok.decode([5, 4096])).toThrow(/token id 4096 is outside the vocabulary/);
    expect(() => tok.decode([-1])).toThrow(/token id -1 is outside the vocabulary/);
  }
});

test("add_bos_token / add_eos_token are honored; without them the post-processor decides", () => {
  const body = hfTok.encode("Fair", { addSpecial: false });
  const cases: [boolean, boolean, number[]][] = [
    [false, false, body],
    [true, true, [1, ...body, 2]],
    [false, true, [...body, 2]],
  ];
  for (const [bos, eos, expected] of cases) {
    const hf = hfTokenizer(tokenizerJson, { ...tokenizerConfig, add_bos_token: bos, add_eos_token: eos });
    const gguf = ggufTokenizer(
      new Map([...ggufMetadata, ["tokenizer.ggml.add_bos_token", bos], ["tokenizer.ggml.add_eos_token", eos]]),
    );
    for (const tok of [hf, gguf]) {
      expect(tok.encode("Fair")).toEqual(expected);
      expect(tok.encode("Fair", { addSpecial: false })).toEqual(body);
    }
  }
  const { add_bos_token: _bos, add_eos_token: _eos, ...noFlags } = tokenizerConfig;
  expect(hfTokenizer(tokenizerJson, noFlags).encode("Fair")).toEqual([1, ...body]); // TemplateProcessing adds <s>
});

describe("SentencePiece vocabulary with a U+FEFF token, GGUF file vs tokenizer.json", () => {
  const { gguf: fromGGUF, hf, bomId } = sentencePiecePair();

  test("GGUF strings are read byte-exact: values starting with U+FEFF keep it", () => {
    const bytes = encodeGGUF({ [`${BOM}key`]: gguf.str(`${BOM}value`), list: gguf.strings([BOM, `${BOM}x`, "y"]) }, []);
    const { metadata } = readGGUF({ path: "bom.gguf", bytes, size: bytes.byteLength, ptr: 0, close() {} });
    expect([...metadata]).toEqual([
      [`${BOM}key`, `${BOM}value`],
      ["list", [BOM, `${BOM}x`, "y"]],
    ]);
    expect(fromGGUF.idToToken(bomId)).toBe(BOM);
  });

  test("U+FEFF in text encodes as its own token, as tokenizer.json does, and decodes back", () => {
    for (const text of ["a\uFEFFb", "\uFEFF", "\uFEFFhello", "x \uFEFF\uFEFF"]) {
      const ids = fromGGUF.encode(text, { addSpecial: false });
      expect(ids).toContain(bomId);
      expect(ids).toEqual(hf.encode(text, { addSpecial: false }));
      expect(fromGGUF.decode(ids)).toBe(text);
      expect(hf.decode(ids)).toBe(text);
    }
  });

  test("GGUF encodes like tokenizer.json on hard strings, with special-token matching on and off", () => {
    for (const text of HARD_TEXTS) {
      for (const parseSpecial of [true, false]) {
        for (const addSpecial of [true, false]) {
          const opts = { parseSpecial, addSpecial };
          expect({ text, opts, ids: fromGGUF.encode(text, opts) }).toEqual({ text, opts, ids: hf.encode(text, opts) });
        }
      }
    }
  });

  test("special tokens written in text match only with parseSpecial, and decode back either way", () => {
    for (const tok of [fromGGUF, hf]) {
      expect(tok.encode("a</s>", { addSpecial: false })).toContain(2);
      const plain = tok.encode("a</s><s><unk>", { addSpecial: false, parseSpecial: false });
      expect(plain.filter((id) => id <= 2)).toEqual([]);
      expect(tok.decode(plain)).toBe("a</s><s><unk>");
    }
  });

  test("decode(encode(x)) == x on hard strings", () => {
    for (const text of HARD_TEXTS) {
      for (const tok of [fromGGUF, hf]) {
        expect(tok.decode(tok.encode(text, { parseSpecial: false }))).toBe(text);
      }
    }
  });
});

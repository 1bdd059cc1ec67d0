// Byte-level BPE from GGUF metadata (our implementation) against @huggingface/tokenizers
// fed the equivalent tokenizer.json, on a tiny vocabulary trained here; and the
// `tokenizer.ggml.pre` names llama.cpp writes.

import { describe, expect, test } from "bun:test";
import { ggufTokenizer } from "../../src/tokenizer/gguf.ts";
import { hfTokenizer } from "../../src/tokenizer/hf.ts";
import { PRE_TOKENIZERS, splitWords } from "../../src/tokenizer/pretokenize.ts";
import { byteLevelPair, EOT, HARD_TEXTS, TOOL, toByteChars } from "./builders.ts";

for (const pre of ["gpt-2", "llama-bpe"] as const) {
  describe(`byte-level BPE, pre-tokenizer ${pre}`, () => {
    const { gguf, hf, eotId, toolId } = byteLevelPair(pre);

    test("GGUF encodes like tokenizer.json, with special-token matching on and off", () => {
      for (const text of HARD_TEXTS) {
        for (const parseSpecial of [true, false]) {
          const opts = { parseSpecial };
          expect({ text, parseSpecial, ids: gguf.encode(text, opts) }).toEqual({ text, parseSpecial, ids: hf.encode(text, opts) });
        }
      }
      // The merges really are exercised: far fewer tokens than bytes.
      const sentence = HARD_TEXTS[0];
      expect(gguf.encode(sentence).length).toBeLessThan(new TextEncoder().encode(sentence).length / 2);
    });

    test("special tokens match only with parseSpecial; user-defined ones always", () => {
      for (const tok of [gguf, hf]) {
        expect(tok.encode(EOT)).toEqual([eotId]);
        expect(tok.encode(EOT, { parseSpecial: false })).not.toContain(eotId);
        expect(tok.decode(tok.encode(EOT, { parseSpecial: false }))).toBe(EOT);
        expect(tok.encode(`a${TOOL}`, { parseSpecial: false })).toContain(toolId);
      }
    });

    test("decodes like tokenizer.json and gives the text back", () => {
      for (const text of HARD_TEXTS) {
        const ids = gguf.encode(text);
        expect(gguf.decode(ids, { skipSpecial: false })).toBe(hf.decode(ids, { skipSpecial: false }));
        expect(gguf.decode(ids, { skipSpecial: false })).toBe(text);
        expect(gguf.decode(ids)).toBe(hf.decode(ids));
      }
    });

    test("the end-of-text token is special and ends generation", () => {
      expect(gguf.isSpecial(eotId)).toBe(true);
      expect(gguf.isSpecial(toolId)).toBe(false);
      expect(gguf.eosIds).toEqual([eotId]);
      expect(gguf.encode("x", { addSpecial: true })).toEqual(gguf.encode("x", { addSpecial: false }));
    });
  });
}

test("with parseSpecial off, a post-processor still adds its special tokens by id", () => {
  const { json, eotId } = byteLevelPair("llama-bpe");
  const special = { id: EOT, ids: [eotId], tokens: [EOT] };
  const postProcessor = {
    type: "TemplateProcessing",
    single: [{ SpecialToken: { id: EOT, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
    pair: [],
    special_tokens: { [EOT]: special },
  };
  // No add_bos_token in the config: the post-processor decides, as for Llama 3.
  const tok = hfTokenizer({ ...json, post_processor: postProcessor }, { bos_token: EOT, eos_token: EOT });
  const text = `${EOT}x`;
  const ids = tok.encode(text, { parseSpecial: false });
  expect(ids[0]).toBe(eotId);
  expect(ids.slice(1)).not.toContain(eotId);
  expect(tok.decode(ids.slice(1))).toBe(text);
  expect(tok.encode(text)).toEqual([eotId, eotId, ...tok.encode("x", { addSpecial: false })]);
});

test("whole-word vocabulary hits skip merging only for llama-bpe", () => {
  const zebra = toByteChars(" zebra");
  const llama3 = byteLevelPair("llama-bpe").gguf;
  const gpt2 = byteLevelPair("gpt-2").gguf;
  expect(llama3.encode(" zebra").map((id) => llama3.idToToken(id))).toEqual([zebra]);
  expect(gpt2.encode(" zebra").length).toBeGreaterThan(1);
});

// The values llama.cpp's vocabulary loader (llama-vocab.cpp) recognizes for byte-level
// BPE, grouped by the split each one selects there.
const LLAMA_CPP_PRE_NAMES: Record<string, string[]> = {
  gpt2: ["gpt-2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
    "roberta-bpe", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"],
  llama3: ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"],
  qwen2: ["qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2"],
  starcoder: ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"],
  falcon: ["falcon"],
  default: ["default"],
  bloom: ["poro-chat", "bloom", "gpt3-finnish"],
  viking: ["viking"],
  tekken: ["tekken"],
  deepseekCoder: ["deepseek-coder"],
  seedCoder: ["seed-coder"],
};

// Splits worked out by hand from each group's patterns (llama.cpp applies them in turn,
// keeping the text between matches as pieces too).
const SAMPLE = "Hello, 1234 world!! $x";
const EXPECTED_SPLITS: Record<string, string[]> = {
  gpt2: ["Hello", ",", " 1234", " world", "!!", " $", "x"],
  llama3: ["Hello", ",", " ", "123", "4", " world", "!!", " $", "x"],
  qwen2: ["Hello", ",", " ", "1", "2", "3", "4", " world", "!!", " $", "x"],
  starcoder: ["Hello", ",", " ", "1", "2", "3", "4", " world", "!!", " $", "x"],
  falcon: ["Hello", ",", " ", "123", "4", " world", "!!", " ", "$", "x"],
  default: ["Hello", ",", " ", "123", "4", " world", "!!", " ", "$", "x"],
  bloom: ["Hello", ",", " 1234", " world", "!!", " $x"],
  viking: ["Hello", ",", " ", "1", "2", "3", "4", " world", "!!", " $x"],
  tekken: ["Hello", ",", " ", "1", "2", "3", "4", " world", "!!", " $", "x"],
  deepseekCoder: ["Hello", ",", " ", "1", "2", "3", "4", " world", "!!", " $", "x"],
  seedCoder: ["Hello", ",", " ", "1", "2", "3", "4", " world", "!!", " $", "x"],
};

test("every tokenizer.ggml.pre name llama.cpp writes loads and splits as llama.cpp's rules say", () => {
  const base = byteLevelPair("gpt-2").gguf;
  const tokens = Array.from({ length: base.vocabSize }, (_, id) => base.idToToken(id)!);
  for (const [group, names] of Object.entries(LLAMA_CPP_PRE_NAMES)) {
    for (const name of names) {
      const pre = PRE_TOKENIZERS.get(name);
      expect({ name, split: pre && splitWords(SAMPLE, pre) }).toEqual({ name, split: EXPECTED_SPLITS[group] });
      const tok = ggufTokenizer(
        new Map<string, unknown>([
          ["tokenizer.ggml.model", "gpt2"],
          ["tokenizer.ggml.pre", name],
          ["tokenizer.ggml.tokens", tokens],
          ["tokenizer.ggml.merges", []],
        ]),
      );
      expect(tok.decode(tok.encode(SAMPLE))).toBe(SAMPLE);
    }
  }
});

test("pre-tokenizer rules that differ beyond the sample", () => {
  const split = (name: string, text: string) => splitWords(text, PRE_TOKENIZERS.get(name)!);
  // Seed-Coder's punctuation runs leave line breaks to the whitespace rule.
  expect(split("seed-coder", "ok.\n\nx")).toEqual(["ok", ".", "\n\n", "x"]);
  // Mistral Nemo's split breaks words where lower case turns to upper case.
  expect(split("tekken", "HelloWorld ABCdef")).toEqual(["Hello", "World", " ABCdef"]);
  // Llama-3 keeps newlines with the punctuation before them and apostrophes case-free.
  expect(split("llama-bpe", "ok.\n\nI'LL")).toEqual(["ok", ".\n\n", "I", "'LL"]);
  expect(split("gpt-2", "I'LL")).toEqual(["I", "'", "LL"]);
  // U+FEFF is not whitespace (JavaScript's \s says it is); U+0085 is.
  expect(split("gpt-2", "\uFEFF. a\u0085 b")).toEqual(["\uFEFF.", " a", "\u0085", " b"]);
});

test("without tokenizer.ggml.add_bos_token, BOS is added for Llama-3-style pre-tokenizers only (llama.cpp's defaults)", () => {
  for (const [pre, addsBos] of [["llama-bpe", true], ["tekken", true], ["gpt-2", false], ["qwen2", false], ["default", false]] as const) {
    const tok = ggufTokenizer(
      new Map<string, unknown>([
        ["tokenizer.ggml.model", "gpt2"],
        ["tokenizer.ggml.pre", pre],
        ["tokenizer.ggml.tokens", ["a", "b", "<s>"]],
        ["tokenizer.ggml.merges", []],
        ["tokenizer.ggml.bos_token_id", 2],
      ]),
    );
    expect({ pre, ids: tok.encode("ab") }).toEqual({ pre, ids: addsBos ? [2, 0, 1] : [0, 1] });
  }
});

test("an unknown pre-tokenizer is refused, listing the known ones", () => {
  for (const name of ["gpt2", "chameleon", "made-up", "constructor"]) {
    const metadata = new Map<string, unknown>([
      ["tokenizer.ggml.model", "gpt2"],
      ["tokenizer.ggml.pre", name],
      ["tokenizer.ggml.tokens", ["a"]],
      ["tokenizer.ggml.merges", []],
    ]);
    expect(() => ggufTokenizer(metadata, "m.gguf")).toThrow(
      new RegExp(`m\\.gguf: tokenizer\\.ggml\\.pre = "${name}" is not supported \\(supported: default, gpt-2, .*llama-bpe.*\\)`),
    );
  }
});

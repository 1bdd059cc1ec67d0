// The fuzzer's seed models: tiny valid models in every form the loaders read (GGUF with
// a tokenizer in its metadata; HF directories with config.json, safetensors single or
// sharded with model.safetensors.index.json, tokenizer.json and tokenizer_config.json).
// Each mutated case starts from one of these.

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeTinyModel, type TinyDims, type TinyModelOptions } from "../helpers/tiny-model.ts";

const DIMS: TinyDims = { vocab: 40, hidden: 32, intermediate: 64, layers: 2, heads: 2, kvHeads: 1 };

/** A 40-token BPE vocabulary: the specials, the word-start mark, the letters, a few merges. */
const LETTERS = "abcdefghijklmnopqrstuvwxyz".split("");
const MERGES: [string, string][] = [["▁", "t"], ["h", "e"], ["▁t", "he"], ["l", "l"], ["▁", "h"], ["e", "ll"], ["▁h", "ell"], ["▁", "a"], ["o", "r"], ["i", "n"]];
const VOCAB = ["<unk>", "<s>", "</s>", "▁", ...LETTERS, ...MERGES.map(([a, b]) => a + b)];

function tokenizerJson(): object {
  const special = (id: number) => ({ id, content: VOCAB[id], single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0), special(1), special(2)],
    normalizer: { type: "Sequence", normalizers: [{ type: "Prepend", prepend: "▁" }, { type: "Replace", pattern: { String: " " }, content: "▁" }] },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: { type: "Sequence", decoders: [{ type: "Replace", pattern: { String: "▁" }, content: " " }, { type: "Fuse" }, { type: "Strip", content: " ", start: 1, stop: 0 }] },
    model: {
      type: "BPE", dropout: null, unk_token: "<unk>", continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: true, byte_fallback: false, vocab: Object.fromEntries(VOCAB.map((t, i) => [t, i])), merges: MERGES.map((m) => m.join(" ")),
    },
  };
}

const TOKENIZER_CONFIG = {
  add_bos_token: true,
  add_eos_token: false,
  bos_token: "<s>",
  eos_token: "</s>",
  unk_token: "<unk>",
  chat_template: "{% for m in messages %}{{ m.content }}{% endfor %}",
};

/** The same vocabulary as GGUF metadata: SentencePiece-style ("llama": later merges
 *  score lower) or byte-level BPE ("gpt2": "Ġ" marks a space, merges listed). */
function ggufTokenizerKeys(model: "llama" | "gpt2"): TinyModelOptions["ggufMetadata"] {
  const types = Int32Array.from(VOCAB, (_, i) => (i === 0 ? 2 : i < 3 ? 3 : 1));
  const common = { "tokenizer.ggml.token_type": types, "tokenizer.chat_template": TOKENIZER_CONFIG.chat_template };
  if (model === "llama") {
    const scores = Float32Array.from(VOCAB, (_, i) => (i < 30 ? 0 : -(i - 29)));
    return { "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": VOCAB, "tokenizer.ggml.scores": scores, ...common };
  }
  const byteLevel = (t: string) => t.replaceAll("▁", "Ġ");
  return {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.tokens": VOCAB.map(byteLevel),
    "tokenizer.ggml.merges": MERGES.map((m) => m.map(byteLevel).join(" ")),
    ...common,
  };
}

export interface SeedModel {
  name: string;
  /** What the loaders are given: a .gguf file or an HF directory. */
  path: string;
  /** The directory holding the files. */
  dir: string;
  /** File names in `dir` a mutation may target. */
  files: string[];
}

const SEEDS: { name: string; opts: Omit<TinyModelOptions, "seed" | "dims">; vocab?: "llama" | "gpt2" }[] = [
  { name: "gguf-llama-q8", opts: { dtype: "Q8_0", format: "gguf" }, vocab: "llama" },
  { name: "gguf-llama-q4-tied-ropefreqs", opts: { dtype: "Q4_0", format: "gguf", tied: true, ropeFreqFactors: Float32Array.from({ length: 8 }, (_, i) => 1 + i / 8) }, vocab: "llama" },
  { name: "gguf-qwen2-bf16-gpt2-vocab", opts: { dtype: "BF16", format: "gguf", attentionBias: true }, vocab: "gpt2" },
  { name: "hf-llama-f32", opts: { dtype: "F32", format: "safetensors" } },
  { name: "hf-qwen2-f16-sharded-tied", opts: { dtype: "F16", format: "safetensors", attentionBias: true, tied: true, shards: 2 } },
];

/** Writes every seed model under `root`. */
export function writeSeedModels(root: string): SeedModel[] {
  return SEEDS.map(({ name, opts, vocab }, i) => {
    const dir = join(root, name);
    mkdirSync(dir, { recursive: true });
    const model = writeTinyModel(dir, { seed: 100 + i, dims: DIMS, ...opts, ...(vocab ? { ggufMetadata: ggufTokenizerKeys(vocab) } : {}) });
    if (opts.format === "gguf") return { name, path: model.path, dir, files: ["model.gguf"] };
    writeFileSync(join(dir, "tokenizer.json"), JSON.stringify(tokenizerJson()));
    writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(TOKENIZER_CONFIG));
    const weights = opts.shards
      ? ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
      : ["model.safetensors"];
    return { name, path: dir, dir, files: ["config.json", ...weights, "tokenizer.json", "tokenizer_config.json"] };
  });
}

// Byte-level BPE pre-tokenizers: the word split llama.cpp's loader selects for each
// `tokenizer.ggml.pre` value its converter writes. A rule set is a list of patterns applied in
// turn: each one splits every piece so far into its matches and the gaps between
// them (gaps are kept as pieces, as llama.cpp's splitter does).
//
// Patterns use \p{White_Space} where the originals say \s: JavaScript's \s also matches
// U+FEFF and misses U+0085, unlike Unicode (and llama.cpp's) whitespace.

const W = "\\p{White_Space}";
const NOT_W = "\\P{White_Space}";

/** GPT-2's split: contractions, letter runs, digit runs, other runs, whitespace. */
const GPT2 = `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${W}\\p{L}\\p{N}]+|${W}+(?!${NOT_W})|${W}+`;
/** Llama-3's split; `digits` bounds a digit run, `punctuation` is the run of other
 *  characters (Seed-Coder's leaves line breaks out of it). */
const llama3Like = (digits: string, punctuation = `[^${W}\\p{L}\\p{N}]+[\\r\\n]*`) =>
  `'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}${digits}` +
  `| ?${punctuation}|${W}*[\\r\\n]+|${W}+(?!${NOT_W})|${W}+`;
/** Mistral Nemo's split: words break where lower case turns to upper case. Written with
 *  the Unicode classes of Mistral's own pattern, which llama.cpp approximates. */
const TEKKEN =
  `[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+` +
  `|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*` +
  `|\\p{N}| ?[^${W}\\p{L}\\p{N}]+[\\r\\n/]*|${W}*[\\r\\n]+|${W}+(?!${NOT_W})|${W}+`;
/** BLOOM's split: a run of anything but whitespace and sentence punctuation. */
const BLOOM = ` ?[^(${W}|.,!?…。，、।۔،)]+`;

export interface PreTokenizer {
  patterns: RegExp[];
  /** A whole word found in the vocabulary is one token, merges or not. */
  ignoreMerges: boolean;
  /** Whether BOS is added when the file has no tokenizer.ggml.add_bos_token. */
  addBos: boolean;
}

const rules = (patterns: string[], llama3Style = false): PreTokenizer => ({
  patterns: patterns.map((p) => new RegExp(p, "gu")),
  ignoreMerges: llama3Style,
  addBos: llama3Style,
});

const RULES = {
  default: rules([`[\\p{P}\\$\\+<=>\\^~\\|]+`, GPT2, `\\p{N}+`, `[0-9][0-9][0-9]`]),
  gpt2: rules([GPT2]),
  llama3: rules([llama3Like("{1,3}")], true),
  llama3Merged: rules([llama3Like("{1,3}")]),
  qwen2: rules([llama3Like("")]),
  seedCoder: rules([llama3Like("", `[^${W}\\p{L}\\p{N}\\r\\n]+`)]),
  falcon: rules([`[\\p{P}\\$\\+<=>\\^~\\|\`]+`, GPT2, `[0-9][0-9][0-9]`]),
  starcoder: rules([`\\p{N}`, GPT2]),
  deepseekCoder: rules([`[\\r\\n]`, `${W}?\\p{L}+`, `${W}?\\p{P}+`, `[一-龥ࠀ-一가-퟿]+`, `\\p{N}`]),
  bloom: rules([BLOOM]),
  viking: rules([BLOOM, `\\p{N}`]),
  tekken: rules([TEKKEN], true),
};

/** Each `tokenizer.ggml.pre` value llama.cpp writes for a byte-level BPE vocabulary of
 *  the families loaded here, with the split llama.cpp maps it to. */
export const PRE_TOKENIZERS: ReadonlyMap<string, PreTokenizer> = new Map(Object.entries({
  default: RULES.default,
  "gpt-2": RULES.gpt2,
  "phi-2": RULES.gpt2,
  "jina-es": RULES.gpt2,
  "jina-de": RULES.gpt2,
  "jina-v1-en": RULES.gpt2,
  "jina-v2-es": RULES.gpt2,
  "jina-v2-de": RULES.gpt2,
  "jina-v2-code": RULES.gpt2,
  "roberta-bpe": RULES.gpt2,
  gigachat: RULES.gpt2,
  "a.x-4.0": RULES.gpt2,
  mellum: RULES.gpt2,
  exaone4: RULES.gpt2,
  mpt: RULES.gpt2,
  olmo: RULES.gpt2,
  jais: RULES.gpt2,
  trillion: RULES.gpt2,
  "granite-docling": RULES.gpt2,
  llama3: RULES.llama3,
  "llama-v3": RULES.llama3,
  "llama-bpe": RULES.llama3,
  falcon3: RULES.llama3,
  "falcon-h1": RULES.llama3,
  pixtral: RULES.llama3,
  "midm-2.0": RULES.llama3,
  lfm2: RULES.llama3,
  dbrx: RULES.llama3Merged,
  "smaug-bpe": RULES.llama3Merged,
  qwen2: RULES.qwen2,
  "deepseek-r1-qwen": RULES.qwen2,
  kormo: RULES.qwen2,
  megrez: RULES.qwen2,
  stablelm2: RULES.qwen2,
  hunyuan: RULES.qwen2,
  "grok-2": RULES.qwen2,
  "seed-coder": RULES.seedCoder,
  falcon: RULES.falcon,
  starcoder: RULES.starcoder,
  refact: RULES.starcoder,
  "command-r": RULES.starcoder,
  smollm: RULES.starcoder,
  codeshell: RULES.starcoder,
  exaone: RULES.starcoder,
  "minerva-7b": RULES.starcoder,
  "deepseek-coder": RULES.deepseekCoder,
  "poro-chat": RULES.bloom,
  bloom: RULES.bloom,
  "gpt3-finnish": RULES.bloom,
  viking: RULES.viking,
  tekken: RULES.tekken,
}));

/** Splits `text` into the words BPE merges within, in order; they join back to `text`. */
export function splitWords(text: string, pre: PreTokenizer): string[] {
  let pieces = [text];
  for (const pattern of pre.patterns) pieces = pieces.flatMap((piece) => splitKeepingGaps(piece, pattern));
  return pieces;
}

function splitKeepingGaps(text: string, pattern: RegExp): string[] {
  const out: string[] = [];
  let at = 0;
  for (const m of text.matchAll(pattern)) {
    if (m[0].length === 0) continue;
    if (m.index > at) out.push(text.slice(at, m.index));
    out.push(m[0]);
    at = m.index + m[0].length;
  }
  if (at < text.length) out.push(text.slice(at));
  return out;
}

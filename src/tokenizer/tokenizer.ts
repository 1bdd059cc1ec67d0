// The tokenizer contract shared by the tokenizer.json (hf.ts) and GGUF (gguf.ts)
// implementations, and the incremental text decoder both of them hand out.

export interface EncodeOptions {
  /** Add the model's BOS/EOS (per add_bos_token / add_eos_token). Default true. */
  addSpecial?: boolean;
  /** Match special (control) tokens written literally in the text, e.g. "<s>". Default
   *  true. When false they are encoded as plain text, as llama.cpp's parse_special=false
   *  does; user-defined (non-special) added tokens still match. */
  parseSpecial?: boolean;
}

export interface DecodeOptions {
  /** Drop special tokens (BOS, EOS, UNK, control tokens) from the text. Default true. */
  skipSpecial?: boolean;
}

export interface StreamDecoderOptions extends DecodeOptions {
  /** Ids already decoded elsewhere (usually the prompt). Their text is not emitted;
   *  they only give context, so the output continues them (no leading-space strip).
   *  A character the prefix leaves unfinished is emitted whole once completed. */
  prefix?: readonly number[];
}

export interface StreamDecoder {
  /** Adds tokens (one or several); returns the text that became final (possibly ""). */
  push(...ids: number[]): string;
  /** Ends the stream: returns whatever is still held back (an incomplete UTF-8
   *  sequence, as U+FFFD). */
  flush(): string;
}

export interface Tokenizer {
  /** Number of ids (highest id + 1). */
  readonly vocabSize: number;
  readonly bosId: number | null;
  /** Every id that ends generation (EOS, and EOT/EOM where the model has them). */
  readonly eosIds: number[];
  encode(text: string, opts?: EncodeOptions): number[];
  /** The text of `ids`: their pieces joined, with no clean-up of spaces, so that
   *  decode(encode(text)) gives back `text` wherever the vocabulary can spell it. */
  decode(ids: readonly number[], opts?: DecodeOptions): string;
  /** The vocabulary string of `id`, or undefined outside the vocabulary. */
  idToToken(id: number): string | undefined;
  isSpecial(id: number): boolean;
  /** Incremental decode: for any cut of the ids into pushes, the pushes' texts and
   *  flush() joined equal decode() of all the ids. */
  createStreamDecoder(opts?: StreamDecoderOptions): StreamDecoder;
  /** The chat template called `name` ("default" when omitted), or null. */
  chatTemplate(name?: string): string | null;
}

/**
 * Incremental decoding on top of a whole-sequence `decode`, which must be the pieces'
 * text joined (bytes joined, then UTF-8 decoded), up to dropping a leading space at the
 * very start. Each push decodes a window of ids from `start` and emits what lies beyond
 * the `emitted` characters of it. The window starts at the ids of the emission before
 * the last one: a character boundary, and never an empty text, so a leading-space strip
 * applies to the whole window text or not at all and cancels out. Text ending in U+FFFD
 * is held back: it may be an incomplete character until more bytes or flush() arrive.
 */
export function windowedStreamDecoder(
  decode: (ids: readonly number[]) => string,
  prefix: readonly number[] = [],
): StreamDecoder {
  const ids = [...prefix];
  let start = 0; // first id of the decode window
  let lastEmit = 0; // ids.length at the last emission: the next window's start
  // The prefix's text up to its last complete character counts as emitted.
  let emitted = decode(ids).replace(/\uFFFD+$/, "").length;

  const pending = (): string => decode(ids.slice(start)).slice(emitted);
  const advance = (): void => {
    start = lastEmit;
    lastEmit = ids.length;
    emitted = decode(ids.slice(start)).length;
  };

  return {
    push(...more: number[]): string {
      ids.push(...more);
      const text = pending();
      if (text.length === 0 || text.endsWith("\uFFFD")) return "";
      advance();
      return text;
    },
    flush(): string {
      const text = pending();
      if (text.length > 0) advance();
      return text;
    },
  };
}

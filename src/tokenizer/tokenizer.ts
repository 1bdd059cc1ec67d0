// The tokenizer contract shared by the tokenizer.json (hf.ts) and GGUF (gguf.ts)
// implementations, and the incremental text decoder both of them hand out.

export interface EncodeOptions {
  /** Add the model's BOS/EOS (per add_bos_token / add_eos_token). Default true. */
  addSpecial?: boolean;
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
  /** Adds one token; returns the text that became final (possibly ""). */
  push(id: number): string;
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
  decode(ids: readonly number[], opts?: DecodeOptions): string;
  /** The vocabulary string of `id`, or undefined outside the vocabulary. */
  idToToken(id: number): string | undefined;
  isSpecial(id: number): boolean;
  createStreamDecoder(opts?: StreamDecoderOptions): StreamDecoder;
  /** The chat template called `name` ("default" when omitted), or null. */
  chatTemplate(name?: string): string | null;
}

/**
 * Incremental decoding on top of a whole-sequence `decode`. Each push decodes a short
 * window twice, with and without the tokens not yet emitted, and emits the difference.
 * The window starts where text was last emitted whole, so it never begins inside a
 * UTF-8 character, and the start-of-text space strip is applied identically to both
 * decodes (hence only once, at the real start). Text ending in U+FFFD is held back: it
 * is an incomplete byte-fallback character until more bytes or flush() arrive.
 * pushes + flush == decode(all ids) holds whenever decode is a plain concatenation of
 * token texts up to that strip (not with clean_up_tokenization_spaces).
 */
export function windowedStreamDecoder(
  decode: (ids: readonly number[]) => string,
  prefix: readonly number[] = [],
): StreamDecoder {
  const ids = [...prefix];
  let start = 0; // first id of the decode window
  let read = ids.length; // ids before this are already emitted (or given as prefix)
  // A prefix that ends inside a character (at most 3 bytes of 4) leaves those
  // tokens pending, so the completed character is emitted here.
  for (let back = 0; back < 3 && read > 0 && decode(ids.slice(0, read)).endsWith("\uFFFD"); back++) read--;

  const pending = (): string => {
    const done = decode(ids.slice(start, read));
    const all = decode(ids.slice(start));
    return all.slice(done.length);
  };

  return {
    push(id: number): string {
      ids.push(id);
      const text = pending();
      if (text.length === 0 || text.endsWith("\uFFFD")) return "";
      start = read;
      read = ids.length;
      return text;
    },
    flush(): string {
      const text = pending();
      start = read;
      read = ids.length;
      return text;
    },
  };
}

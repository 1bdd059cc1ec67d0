// Tokenizers built from GGUF metadata (`tokenizer.ggml.*`), implemented here:
//  - model "llama": SentencePiece BPE (merge the adjacent pair whose concatenation has
//    the highest score; characters outside the vocabulary fall back to <0xNN> byte
//    tokens; a dummy-prefix "▁" and spaces written as "▁").
//  - model "gpt2": byte-level BPE (bytes mapped to printable characters, split into
//    words by the pre-tokenizer `tokenizer.ggml.pre` names (pretokenize.ts), merged by
//    the rank in `tokenizer.ggml.merges`). An unknown pre-tokenizer is refused rather
//    than tokenized wrongly.
// Control, user-defined and unknown tokens written literally in the text are matched
// as single tokens (leftmost, longest first), as Hugging Face tokenizers do; with
// parseSpecial off only user-defined ones are, as in llama.cpp.

import { mergeSymbols, type PairPriority } from "./bpe.ts";
import { PRE_TOKENIZERS, splitWords, type PreTokenizer } from "./pretokenize.ts";
import {
  windowedStreamDecoder,
  type DecodeOptions,
  type EncodeOptions,
  type StreamDecoderOptions,
  type Tokenizer,
} from "./tokenizer.ts";

/** `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type). */
export enum TokenType {
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
}

const SPIECE_SPACE = "\u2581"; // "▁"

/** GPT-2's reversible byte → printable character map: printable Latin-1 bytes map to
 *  themselves, the rest to U+0100 onwards in byte order. */
export function byteToUnicode(): string[] {
  const chars: string[] = new Array(256);
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    chars[b] = String.fromCharCode(printable ? b : 256 + shifted++);
  }
  return chars;
}

// --- metadata access --------------------------------------------------------------

class Metadata {
  constructor(
    private readonly map: Map<string, unknown>,
    private readonly where: string,
  ) {}

  fail(detail: string): never {
    throw new Error(`${this.where}: ${detail}`);
  }

  has(key: string): boolean {
    return this.map.has(key);
  }

  keys(): Iterable<string> {
    return this.map.keys();
  }

  string(key: string): string | undefined {
    const v = this.map.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== "string") this.fail(`${key} should be a string`);
    return v;
  }

  integer(key: string): number | undefined {
    const v = this.map.get(key);
    if (v === undefined) return undefined;
    const n = typeof v === "bigint" ? Number(v) : v;
    if (typeof n !== "number" || !Number.isInteger(n)) this.fail(`${key} should be an integer`);
    return n;
  }

  bool(key: string): boolean | undefined {
    const v = this.map.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== "boolean") this.fail(`${key} should be a boolean`);
    return v;
  }

  strings(key: string): string[] | undefined {
    const v = this.map.get(key);
    if (v === undefined) return undefined;
    if (!Array.isArray(v) || v.some((s) => typeof s !== "string")) this.fail(`${key} should be an array of strings`);
    return v;
  }

  /** Numeric arrays arrive as typed arrays from the GGUF reader, or as plain arrays. */
  numbers(key: string): ArrayLike<number> | undefined {
    const v = this.map.get(key);
    if (v === undefined) return undefined;
    const ok =
      (ArrayBuffer.isView(v) && !(v instanceof DataView) && !(v instanceof BigInt64Array) && !(v instanceof BigUint64Array)) ||
      (Array.isArray(v) && v.every((x) => typeof x === "number"));
    if (!ok) this.fail(`${key} should be an array of numbers`);
    return v as ArrayLike<number>;
  }
}

// --- the shared vocabulary machinery ------------------------------------------------

const utf8Encoder = new TextEncoder();
// Non-fatal (invalid bytes become U+FFFD) and keeping a leading U+FEFF: it is text.
const utf8Decoder = new TextDecoder("utf-8", { ignoreBOM: true });

abstract class GGUFTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosIds: number[];
  protected readonly tokens: string[];
  protected readonly types: ArrayLike<number> | null;
  protected readonly tokenToId = new Map<string, number>();
  protected readonly unkId: number | null;
  private readonly addBos: boolean;
  /** The id add_eos_token appends, or null when nothing is appended. */
  private readonly appendedEos: number | null;
  /** Literal-text tokens matched before BPE, grouped by first character, longest first. */
  private readonly literalTokens = new Map<string, { text: string; id: number; userDefined: boolean }[]>();
  private readonly templates: Map<string, string>;
  /** Per-id UTF-8 bytes of the token's text, built on first decode. */
  private readonly bytesCache: (Uint8Array | undefined)[] = [];

  constructor(
    protected readonly meta: Metadata,
    defaultAddBos: boolean,
  ) {
    this.tokens = meta.strings("tokenizer.ggml.tokens") ?? meta.fail("tokenizer.ggml.tokens is missing");
    this.vocabSize = this.tokens.length;
    this.types = meta.numbers("tokenizer.ggml.token_type") ?? null;
    if (this.types && this.types.length !== this.vocabSize) {
      meta.fail(`tokenizer.ggml.token_type has ${this.types.length} entries for ${this.vocabSize} tokens`);
    }
    // The first id wins for duplicate texts, as in llama.cpp.
    for (let id = this.vocabSize - 1; id >= 0; id--) this.tokenToId.set(this.tokens[id], id);

    const id = (key: string): number | null => {
      const v = meta.integer(key);
      if (v === undefined) return null;
      if (v < 0 || v >= this.vocabSize) meta.fail(`${key} = ${v} is outside the vocabulary (${this.vocabSize} tokens)`);
      return v;
    };
    this.bosId = id("tokenizer.ggml.bos_token_id");
    const eosId = id("tokenizer.ggml.eos_token_id");
    const stopIds = [eosId, id("tokenizer.ggml.eot_token_id"), id("tokenizer.ggml.eom_token_id")];
    this.eosIds = [...new Set(stopIds.filter((x): x is number => x !== null))];
    this.unkId = id("tokenizer.ggml.unknown_token_id");
    this.addBos = (meta.bool("tokenizer.ggml.add_bos_token") ?? defaultAddBos) && this.bosId !== null;
    this.appendedEos = meta.bool("tokenizer.ggml.add_eos_token") ? eosId : null;

    for (let i = 0; i < this.vocabSize; i++) {
      const type = this.typeOf(i);
      const text = this.tokens[i];
      if (text.length === 0) continue;
      if (type !== TokenType.Control && type !== TokenType.UserDefined && type !== TokenType.Unknown) continue;
      const first = text[0];
      const list = this.literalTokens.get(first) ?? [];
      list.push({ text, id: i, userDefined: type === TokenType.UserDefined });
      this.literalTokens.set(first, list);
    }
    for (const list of this.literalTokens.values()) list.sort((a, b) => b.text.length - a.text.length);

    this.templates = new Map();
    for (const key of meta.keys()) {
      if (key === "tokenizer.chat_template") this.templates.set("default", meta.string(key)!);
      else if (key.startsWith("tokenizer.chat_template.")) {
        this.templates.set(key.slice("tokenizer.chat_template.".length), meta.string(key)!);
      }
    }
  }

  protected typeOf(id: number): number {
    return this.types ? this.types[id] : TokenType.Normal;
  }

  /** Ids of one run of plain text; `atStart` is true at the text's start and right after
   *  a literal token (where SentencePiece adds its dummy prefix). */
  protected abstract encodeText(text: string, atStart: boolean, out: number[]): void;
  /** The bytes a normal / user-defined / byte token stands for. */
  protected abstract pieceBytes(id: number): Uint8Array;
  /** Whether decode drops one leading space (the dummy prefix). */
  protected abstract readonly stripsLeadingSpace: boolean;

  encode(text: string, opts: EncodeOptions = {}): number[] {
    const addSpecial = opts.addSpecial ?? true;
    const parseSpecial = opts.parseSpecial ?? true;
    const ids: number[] = [];
    if (addSpecial && this.addBos) ids.push(this.bosId!);
    let atStart = true;
    let plainFrom = 0;
    let i = 0;
    while (i < text.length) {
      const literal = this.literalTokens
        .get(text[i])
        ?.find((t) => (parseSpecial || t.userDefined) && text.startsWith(t.text, i));
      if (!literal) {
        i++;
        continue;
      }
      if (i > plainFrom) this.encodeText(text.slice(plainFrom, i), atStart, ids);
      ids.push(literal.id);
      atStart = true;
      i += literal.text.length;
      plainFrom = i;
    }
    if (text.length > plainFrom) this.encodeText(text.slice(plainFrom), atStart, ids);
    if (addSpecial && this.appendedEos !== null) ids.push(this.appendedEos);
    return ids;
  }

  /** Unknown-token id for text the vocabulary cannot represent. */
  protected unknown(piece: string): number {
    if (this.unkId === null) {
      this.meta.fail(`cannot encode ${JSON.stringify(piece)}: not in the vocabulary and no unknown token`);
    }
    return this.unkId;
  }

  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    const skipSpecial = opts.skipSpecial ?? true;
    const parts: Uint8Array[] = [];
    let total = 0;
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new RangeError(`token id ${id} is outside the vocabulary (${this.vocabSize} tokens)`);
      }
      if (skipSpecial && this.isSpecial(id)) continue;
      let bytes = this.bytesCache[id];
      if (!bytes) {
        bytes = this.isSpecial(id) ? utf8Encoder.encode(this.tokens[id]) : this.pieceBytes(id);
        this.bytesCache[id] = bytes;
      }
      parts.push(bytes);
      total += bytes.length;
    }
    const all = new Uint8Array(total);
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    // One decode over all bytes: byte-fallback tokens join into whole characters, and
    // invalid sequences become U+FFFD.
    const text = utf8Decoder.decode(all);
    return this.stripsLeadingSpace && text.startsWith(" ") ? text.slice(1) : text;
  }

  idToToken(id: number): string | undefined {
    return this.tokens[id];
  }

  isSpecial(id: number): boolean {
    const type = this.typeOf(id);
    return type === TokenType.Control || type === TokenType.Unknown;
  }

  createStreamDecoder(opts: StreamDecoderOptions = {}) {
    return windowedStreamDecoder((ids) => this.decode(ids, opts), opts.prefix);
  }

  chatTemplate(name = "default"): string | null {
    return this.templates.get(name) ?? null;
  }
}

// --- SentencePiece BPE ("llama") ----------------------------------------------------

class SentencePieceTokenizer extends GGUFTokenizer {
  protected readonly stripsLeadingSpace: boolean;
  private readonly addSpacePrefix: boolean;
  private readonly scores: ArrayLike<number>;
  private readonly byteIds: (number | undefined)[] = [];
  private readonly priority: PairPriority;

  constructor(meta: Metadata) {
    super(meta, true);
    this.scores = meta.numbers("tokenizer.ggml.scores") ?? meta.fail("tokenizer.ggml.scores is missing");
    if (this.scores.length !== this.vocabSize) {
      meta.fail(`tokenizer.ggml.scores has ${this.scores.length} entries for ${this.vocabSize} tokens`);
    }
    this.addSpacePrefix = meta.bool("tokenizer.ggml.add_space_prefix") ?? true;
    this.stripsLeadingSpace = this.addSpacePrefix;
    for (let b = 0; b < 256; b++) {
      this.byteIds[b] = this.tokenToId.get(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    }
    // SentencePiece only merges into ordinary pieces, never into control/byte tokens.
    this.priority = (left, right) => {
      const id = this.tokenToId.get(left + right);
      if (id === undefined) return undefined;
      const type = this.typeOf(id);
      if (type !== TokenType.Normal && type !== TokenType.UserDefined) return undefined;
      return -this.scores[id];
    };
  }

  protected encodeText(text: string, atStart: boolean, out: number[]): void {
    const spaced = (atStart && this.addSpacePrefix ? " " : "") + text;
    const pieces = mergeSymbols(Array.from(spaced.replaceAll(" ", SPIECE_SPACE)), this.priority);
    for (const piece of pieces) {
      const id = this.tokenToId.get(piece);
      if (id !== undefined) {
        out.push(id);
        continue;
      }
      // Only single characters reach here (merges only form vocabulary pieces).
      const byteIds = Array.from(utf8Encoder.encode(piece), (b) => this.byteIds[b]);
      if (byteIds.every((b) => b !== undefined)) out.push(...(byteIds as number[]));
      else out.push(this.unknown(piece));
    }
  }

  protected pieceBytes(id: number): Uint8Array {
    const text = this.tokens[id];
    if (this.typeOf(id) === TokenType.Byte) {
      const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(text);
      if (!m) this.meta.fail(`byte token ${id} is ${JSON.stringify(text)}, expected <0xNN>`);
      return Uint8Array.of(parseInt(m[1], 16));
    }
    return utf8Encoder.encode(text.replaceAll(SPIECE_SPACE, " "));
  }
}

// --- byte-level BPE ("gpt2") ------------------------------------------------------

const BYTE_CHARS = byteToUnicode();
const CHAR_TO_BYTE = new Map(BYTE_CHARS.map((c, b) => [c, b]));
const MAX_CACHED_WORDS = 50_000;

class ByteLevelBPETokenizer extends GGUFTokenizer {
  protected readonly stripsLeadingSpace = false;
  private readonly pre: PreTokenizer;
  private readonly ranks = new Map<string, number>();
  private readonly priority: PairPriority = (left, right) => this.ranks.get(`${left} ${right}`);
  private readonly wordCache = new Map<string, number[]>();

  constructor(meta: Metadata) {
    const pre = preTokenizerOf(meta);
    super(meta, pre.addBos);
    this.pre = pre;
    const merges = meta.strings("tokenizer.ggml.merges") ?? meta.fail("tokenizer.ggml.merges is missing");
    // Byte-level pieces never contain a real space, so "left right" is unambiguous.
    merges.forEach((m, rank) => {
      if (!this.ranks.has(m)) this.ranks.set(m, rank);
    });
  }

  protected encodeText(text: string, _atStart: boolean, out: number[]): void {
    for (const word of splitWords(text, this.pre)) {
      const mapped = Array.from(utf8Encoder.encode(word), (b) => BYTE_CHARS[b]).join("");
      let ids = this.wordCache.get(mapped);
      if (!ids) {
        const whole = this.pre.ignoreMerges ? this.tokenToId.get(mapped) : undefined;
        ids =
          whole !== undefined
            ? [whole]
            : mergeSymbols(Array.from(mapped), this.priority).map((p) => this.tokenToId.get(p) ?? this.unknown(p));
        if (this.wordCache.size >= MAX_CACHED_WORDS) this.wordCache.clear();
        this.wordCache.set(mapped, ids);
      }
      out.push(...ids);
    }
  }

  protected pieceBytes(id: number): Uint8Array {
    const text = this.tokens[id];
    // User-defined tokens are stored as plain text, not in the byte alphabet.
    if (this.typeOf(id) === TokenType.UserDefined) return utf8Encoder.encode(text);
    const bytes: number[] = [];
    for (const ch of text) {
      const b = CHAR_TO_BYTE.get(ch);
      if (b !== undefined) bytes.push(b);
      else bytes.push(...utf8Encoder.encode(ch));
    }
    return Uint8Array.from(bytes);
  }
}

function preTokenizerOf(meta: Metadata): PreTokenizer {
  const name = meta.string("tokenizer.ggml.pre") ?? "default";
  return (
    PRE_TOKENIZERS.get(name) ??
    meta.fail(
      `tokenizer.ggml.pre = ${JSON.stringify(name)} is not supported ` +
        `(supported: ${[...PRE_TOKENIZERS.keys()].join(", ")})`,
    )
  );
}

/** A tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template*`).
 *  `where` names the source in error messages. */
export function ggufTokenizer(metadata: Map<string, unknown>, where = "GGUF metadata"): Tokenizer {
  const meta = new Metadata(metadata, where);
  const model = meta.string("tokenizer.ggml.model");
  switch (model) {
    case "llama":
      return new SentencePieceTokenizer(meta);
    case "gpt2":
      return new ByteLevelBPETokenizer(meta);
    case undefined:
      return meta.fail("no tokenizer: tokenizer.ggml.model is missing");
    default:
      return meta.fail(`tokenizer.ggml.model = ${JSON.stringify(model)} is not supported (supported: llama, gpt2)`);
  }
}

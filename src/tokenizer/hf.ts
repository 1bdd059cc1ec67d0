// Tokenizer from a Hugging Face tokenizer.json (+ tokenizer_config.json), run by
// @huggingface/tokenizers. Decoding never applies clean_up_tokenization_spaces: that
// clean-up deletes spaces the text had ("I 'm" -> "I'm"), so decode(encode(s)) would
// not give s back and streamed text could not equal the whole decode (llama.cpp does
// not apply it either).

import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ByteFallbackDecoder, SequenceDecoder, Tokenizer as HFTokenizer } from "@huggingface/tokenizers";
import {
  windowedStreamDecoder,
  type DecodeOptions,
  type EncodeOptions,
  type StreamDecoderOptions,
  type Tokenizer,
} from "./tokenizer.ts";

/** The parts of tokenizer_config.json this module reads. */
export interface HFTokenizerConfig {
  add_bos_token?: boolean;
  add_eos_token?: boolean;
  bos_token?: string | { content: string } | null;
  eos_token?: string | { content: string } | null;
  chat_template?: string | { name: string; template: string }[];
  [key: string]: unknown;
}

export interface HFTokenizerExtras {
  /** generation_config.json's eos_token_id (one id or a list), added to eosIds. */
  eosTokenId?: number | number[];
  /** A chat template from a separate file (chat_template.jinja); the config's wins. */
  chatTemplate?: string;
}

/** Named chat templates from tokenizer_config.json's chat_template (string or list). */
export function chatTemplatesFromConfig(value: unknown, where: string): Map<string, string> {
  const templates = new Map<string, string>();
  if (value === undefined || value === null) return templates;
  if (typeof value === "string") {
    templates.set("default", value);
    return templates;
  }
  if (Array.isArray(value)) {
    for (const entry of value) {
      if (typeof entry?.name !== "string" || typeof entry?.template !== "string") {
        throw new Error(`${where}: chat_template list entries must be {name, template} strings`);
      }
      templates.set(entry.name, entry.template);
    }
    return templates;
  }
  throw new Error(`${where}: chat_template must be a string or a list of {name, template}`);
}

function tokenContent(token: HFTokenizerConfig["bos_token"]): string | null {
  if (typeof token === "string") return token;
  if (token && typeof token === "object" && typeof token.content === "string") return token.content;
  return null;
}

class HFBackedTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosIds: number[];
  private readonly special = new Set<number>();
  private readonly templates: Map<string, string>;
  /** BOS/EOS come from the config flags when it sets them, else from the
   *  tokenizer.json post-processor (e.g. Llama-3, whose config has no flags). */
  private readonly manualSpecial: boolean;
  private readonly addBos: boolean;
  /** The id add_eos_token appends, or null when nothing is appended. */
  private readonly appendedEos: number | null;

  /** The same tokenizer with its special added tokens as plain text (parseSpecial off). */
  private plainSpecials: HFTokenizer | null = null;

  constructor(
    private readonly hf: HFTokenizer,
    private readonly makePlainSpecials: () => HFTokenizer,
    config: HFTokenizerConfig,
    private readonly where: string,
    extras: HFTokenizerExtras = {},
  ) {
    let maxId = -1;
    for (const id of hf.get_vocab(true).values()) maxId = Math.max(maxId, id);
    for (const [id, token] of hf.get_added_tokens_decoder()) {
      maxId = Math.max(maxId, id);
      if (token.special) this.special.add(id);
    }
    this.vocabSize = maxId + 1;

    const idOf = (token: HFTokenizerConfig["bos_token"]): number | null => {
      const content = tokenContent(token);
      return content === null ? null : (hf.token_to_id(content) ?? null);
    };
    this.bosId = idOf(config.bos_token);
    const eos = new Set<number>();
    const eosId = idOf(config.eos_token);
    if (eosId !== null) eos.add(eosId);
    for (const id of [extras.eosTokenId ?? []].flat()) eos.add(id);
    this.eosIds = [...eos];

    this.manualSpecial = config.add_bos_token !== undefined || config.add_eos_token !== undefined;
    this.addBos = config.add_bos_token === true && this.bosId !== null;
    this.appendedEos = config.add_eos_token === true ? eosId : null;

    this.templates = chatTemplatesFromConfig(config.chat_template, where);
    if (!this.templates.has("default") && extras.chatTemplate !== undefined) {
      this.templates.set("default", extras.chatTemplate);
    }
  }

  encode(text: string, opts: EncodeOptions = {}): number[] {
    const addSpecial = opts.addSpecial ?? true;
    const postProcess = addSpecial && !this.manualSpecial;
    const ids =
      opts.parseSpecial === false
        ? this.encodeSpecialsAsText(text, postProcess)
        : this.hf.encode(text, { add_special_tokens: postProcess }).ids;
    if (!this.manualSpecial) return ids;
    if (addSpecial && this.addBos) ids.unshift(this.bosId!);
    if (addSpecial && this.appendedEos !== null) ids.push(this.appendedEos);
    return ids;
  }

  /** Encodes with the special added tokens as plain text. Tokens are mapped to ids by the
   *  full tokenizer, which knows the special tokens its post-processor adds. */
  private encodeSpecialsAsText(text: string, postProcess: boolean): number[] {
    this.plainSpecials ??= this.makePlainSpecials();
    return this.plainSpecials.tokenize(text, { add_special_tokens: postProcess }).map((token) => {
      const id = this.hf.token_to_id(token);
      if (id === undefined) throw new Error(`${this.where}: token ${JSON.stringify(token)} has no id`);
      return id;
    });
  }

  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    // The library refuses an empty list.
    if (ids.length === 0) return "";
    // The library would silently print <unk>; an id outside the vocabulary is a bug upstream.
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new RangeError(`token id ${id} is outside the vocabulary (${this.vocabSize} tokens)`);
      }
    }
    return this.hf.decode([...ids], { skip_special_tokens: opts.skipSpecial ?? true, clean_up_tokenization_spaces: false });
  }

  idToToken(id: number): string | undefined {
    return this.hf.id_to_token(id);
  }

  isSpecial(id: number): boolean {
    return this.special.has(id);
  }

  createStreamDecoder(opts: StreamDecoderOptions = {}) {
    return windowedStreamDecoder((ids) => this.decode(ids, opts), opts.prefix);
  }

  chatTemplate(name = "default"): string | null {
    return this.templates.get(name) ?? null;
  }
}

/** A tokenizer from already-parsed tokenizer.json and tokenizer_config.json objects. */
export function hfTokenizer(
  tokenizerJson: object,
  config: HFTokenizerConfig = {},
  extras: HFTokenizerExtras = {},
  where = "tokenizer.json",
): Tokenizer {
  checkVocabulary(tokenizerJson, where);
  checkPipelineStrings(tokenizerJson, where);
  const build = (json: object): HFTokenizer => {
    try {
      const hf = new HFTokenizer(json, config);
      keepByteOrderMarks(hf.decoder);
      hf.decode(hf.encode("a b").ids); // parts the library checks only when used
      return hf;
    } catch (e) {
      throw new Error(`${where}: unsupported or malformed tokenizer (${(e as Error).message})`);
    }
  };
  // Encode-only (encodeSpecialsAsText gives its tokens their ids), built once the full
  // tokenizer has accepted the same json.
  const withoutSpecialAddedTokens = (): HFTokenizer => {
    const added = (tokenizerJson as { added_tokens?: { special?: boolean }[] }).added_tokens ?? [];
    return new HFTokenizer({ ...tokenizerJson, added_tokens: added.filter((t) => !t.special) }, config);
  };
  return new HFBackedTokenizer(build(tokenizerJson), withoutSpecialAddedTokens, config, where, extras);
}

/** The library's byte-fallback decoder drops a U+FEFF that starts a run of byte tokens
 *  (its TextDecoder's default); that U+FEFF is text, so it is kept. */
function keepByteOrderMarks(decoder: HFTokenizer["decoder"]): void {
  if (decoder instanceof ByteFallbackDecoder) decoder.text_decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  if (decoder instanceof SequenceDecoder) decoder.decoders.forEach(keepByteOrderMarks);
}

/** Ids beyond this are refused: the library keeps tokens in arrays indexed by id and
 *  walks them whole, so one huge id would cost a walk that long (no vocabulary is near it). */
const MAX_TOKEN_ID = 1 << 24;

/** The vocabulary's and added tokens' ids must be integers in [0, MAX_TOKEN_ID), and
 *  the unknown token must be one of them (else the library encodes unknown text as
 *  undefined ids). */
function checkVocabulary(json: object, where: string): void {
  const { model, added_tokens } = json as { model?: { vocab?: unknown; unk_token?: unknown }; added_tokens?: unknown };
  const vocab = model?.vocab !== null && typeof model?.vocab === "object" && !Array.isArray(model.vocab) ? (model.vocab as Record<string, unknown>) : null;
  const added = Array.isArray(added_tokens) ? added_tokens : [];
  for (const id of [...Object.values(vocab ?? {}), ...added.map((t) => t?.id)]) {
    if (!Number.isInteger(id) || id < 0 || id >= MAX_TOKEN_ID) {
      throw new Error(`${where}: token id ${String(JSON.stringify(id)).slice(0, 80)} is not an integer in [0, ${MAX_TOKEN_ID})`);
    }
  }
  const unk = model?.unk_token;
  if (vocab && typeof unk === "string" && !Object.hasOwn(vocab, unk) && !added.some((t) => t?.content === unk)) {
    throw new Error(`${where}: unk_token ${JSON.stringify(unk).slice(0, 80)} is not in the vocabulary`);
  }
}

/** Longest string allowed in the normalizer, pre-tokenizer, post-processor and decoder:
 *  the library compiles patterns into regexes and runs BPE over prepended text, at
 *  hundreds of times their length in memory (a 1 MB pattern took 265 MB). Real ones are
 *  a few hundred characters; precompiled_charsmap (a base64 table) is exempt. */
const MAX_PIPELINE_STRING = 4096;

function checkPipelineStrings(json: object, where: string): void {
  const stack: [string, unknown][] = ["normalizer", "pre_tokenizer", "post_processor", "decoder"].map((k) => [k, (json as Record<string, unknown>)[k]]);
  while (stack.length > 0) {
    const [path, value] = stack.pop()!;
    if (typeof value === "string" && value.length > MAX_PIPELINE_STRING && !path.endsWith(".precompiled_charsmap")) {
      throw new Error(`${where}: ${path} is ${value.length} characters long (at most ${MAX_PIPELINE_STRING})`);
    }
    if (value !== null && typeof value === "object") for (const [k, v] of Object.entries(value)) stack.push([`${path}.${k}`, v]);
  }
}

/** A JSON file that must hold an object. */
function readJsonObject(path: string): any {
  const value = readJson(path);
  if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error(`${path}: not a JSON object`);
  return value;
}

function readJson(path: string): any {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new Error(`cannot read ${path}: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${path} is not valid JSON: ${(e as Error).message}`);
  }
}

/** Loads `dir`/tokenizer.json with the optional tokenizer_config.json,
 *  generation_config.json (extra EOS ids) and chat_template.jinja beside it. */
export function loadHFTokenizer(dir: string): Tokenizer {
  const tokenizerPath = join(dir, "tokenizer.json");
  if (!existsSync(tokenizerPath)) throw new Error(`no tokenizer.json in ${dir}`);
  const configPath = join(dir, "tokenizer_config.json");
  const config: HFTokenizerConfig = existsSync(configPath) ? readJsonObject(configPath) : {};
  chatTemplatesFromConfig(config.chat_template, configPath); // a bad template is refused naming its file
  const extras: HFTokenizerExtras = {};
  const generationPath = join(dir, "generation_config.json");
  if (existsSync(generationPath)) {
    const eos = readJsonObject(generationPath).eos_token_id;
    if (typeof eos === "number" || Array.isArray(eos)) extras.eosTokenId = eos;
  }
  const templatePath = join(dir, "chat_template.jinja");
  if (existsSync(templatePath)) extras.chatTemplate = readFileSync(templatePath, "utf8");
  return hfTokenizer(readJsonObject(tokenizerPath), config, extras, tokenizerPath);
}

// GenerationConfig: what a caller may ask of one generation, validated in one place.

export interface GenerationConfig {
  maxNewTokens: number;
  /** 0 = greedy. */
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** 0 = off. */
  minP: number;
  /** 1 = off. */
  repetitionPenalty: number;
  /** OpenAI's presence penalty over the context so far; 0 = off. */
  presencePenalty: number;
  /** OpenAI's frequency penalty over the context so far; 0 = off. */
  frequencyPenalty: number;
  /** Token id -> bias added to its logit (OpenAI's logit_bias, -100..100). */
  logitBias: Record<number, number>;
  seed: number;
  /** Generation ends before the first occurrence of any of these strings. */
  stop: string[];
  /** Extra token ids that end generation (the model's EOS ids always do, unless ignoreEos). */
  stopTokenIds: number[];
  ignoreEos: boolean;
  /** Log-probabilities of emitted tokens under the target model: undefined = none,
   *  0 = the chosen token's, k > 0 = also the k most likely alternatives. */
  logprobs?: number;
  /** Token-tree speculation for this request: off, sized per step by measured cost
   *  ("auto"), or a fixed tree shape and/or prompt lookup. */
  speculation: Speculation;
}

export type Speculation = false | "auto" | { tree?: string; ngram?: boolean };

export const DEFAULT_GENERATION: GenerationConfig = {
  maxNewTokens: 128,
  temperature: 0,
  topK: 0,
  topP: 1,
  minP: 0,
  repetitionPenalty: 1,
  presencePenalty: 0,
  frequencyPenalty: 0,
  logitBias: {},
  seed: 0,
  stop: [],
  stopTokenIds: [],
  ignoreEos: false,
  speculation: "auto",
};

/** Temperatures below this are greedy. */
export const GREEDY_BELOW = 1e-5;

/** Most alternatives `logprobs` may ask for (OpenAI's top_logprobs limit). */
export const MAX_LOGPROBS = 20;

/** A setting out of range, named in the message (in-thread engines and the CLI).
 *  @example
 *  try { resolveGenerationConfig({ topP: 2 }); } catch (e) { if (e instanceof ConfigError) console.log(e.message); }
 */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/** Fills defaults and rejects values that make no sense, naming the field. */
export function resolveGenerationConfig(partial: Partial<GenerationConfig> = {}): GenerationConfig {
  const c: GenerationConfig = { ...DEFAULT_GENERATION, ...definedOnly(partial) };
  const check = (ok: boolean, field: keyof GenerationConfig, want: string) => {
    if (!ok) throw new ConfigError(`${field} must be ${want}, got ${JSON.stringify(c[field])}`);
  };
  check(Number.isInteger(c.maxNewTokens) && c.maxNewTokens >= 0, "maxNewTokens", "an integer >= 0");
  check(Number.isFinite(c.temperature) && c.temperature >= 0, "temperature", "a number >= 0");
  check(Number.isInteger(c.topK) && c.topK >= 0, "topK", "an integer >= 0");
  check(Number.isFinite(c.topP) && c.topP > 0 && c.topP <= 1, "topP", "in (0, 1]");
  check(Number.isFinite(c.minP) && c.minP >= 0 && c.minP <= 1, "minP", "in [0, 1]");
  check(Number.isFinite(c.repetitionPenalty) && c.repetitionPenalty > 0, "repetitionPenalty", "a number > 0");
  check(Number.isFinite(c.presencePenalty) && Math.abs(c.presencePenalty) <= 2, "presencePenalty", "in [-2, 2]");
  check(Number.isFinite(c.frequencyPenalty) && Math.abs(c.frequencyPenalty) <= 2, "frequencyPenalty", "in [-2, 2]");
  check(
    typeof c.logitBias === "object" && c.logitBias !== null &&
      Object.entries(c.logitBias).every(([k, v]) => /^\d+$/.test(k) && typeof v === "number" && Math.abs(v) <= 100),
    "logitBias", "a map of token ids to numbers in [-100, 100]",
  );
  check(c.logprobs === undefined || (Number.isInteger(c.logprobs) && c.logprobs >= 0 && c.logprobs <= MAX_LOGPROBS), "logprobs", `an integer in [0, ${MAX_LOGPROBS}]`);
  check(isSpeculation(c.speculation), "speculation", 'false, "auto" or { tree?: string, ngram?: boolean }');
  check(Number.isSafeInteger(c.seed), "seed", "an integer");
  check(Array.isArray(c.stop) && c.stop.every((s) => typeof s === "string" && s.length > 0), "stop", "a list of non-empty strings");
  check(Array.isArray(c.stopTokenIds) && c.stopTokenIds.every((t) => Number.isInteger(t) && t >= 0), "stopTokenIds", "a list of token ids");
  check(typeof c.ignoreEos === "boolean", "ignoreEos", "a boolean");
  // 1 / temperature overflows below ~1e-308 and leaves no mass; so close to 0, greedy it is (as vLLM).
  if (c.temperature < GREEDY_BELOW) c.temperature = 0;
  return c;
}

function isSpeculation(s: unknown): s is Speculation {
  if (s === false || s === "auto") return true;
  if (typeof s !== "object" || s === null || Array.isArray(s)) return false;
  const o = s as Record<string, unknown>;
  return (o.tree === undefined || typeof o.tree === "string") && (o.ngram === undefined || typeof o.ngram === "boolean");
}

/** `o` without its undefined fields, so spreading it keeps earlier defaults. */
export function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** The sampling defaults a Hugging Face model ships in generation_config.json (what
 *  HF's own generate() would use); {} when there is none. Bad values are ignored here
 *  and caught by resolveGenerationConfig if a caller passes them on. */
export function generationDefaults(json: unknown): Partial<GenerationConfig> {
  if (typeof json !== "object" || json === null) return {};
  const g = json as Record<string, unknown>;
  const num = (v: unknown) => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
  const out: Partial<GenerationConfig> = {};
  if (g.do_sample === false) out.temperature = 0;
  else if (g.do_sample === true) {
    out.temperature = num(g.temperature) ?? 1;
    if (num(g.top_k) !== undefined) out.topK = num(g.top_k);
    if (num(g.top_p) !== undefined) out.topP = num(g.top_p);
    if (num(g.min_p) !== undefined) out.minP = num(g.min_p);
  }
  if (num(g.repetition_penalty) !== undefined) out.repetitionPenalty = num(g.repetition_penalty);
  if (num(g.max_new_tokens) !== undefined) out.maxNewTokens = num(g.max_new_tokens);
  return out;
}

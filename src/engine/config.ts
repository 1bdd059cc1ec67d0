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
  seed: number;
  /** Generation ends before the first occurrence of any of these strings. */
  stop: string[];
  /** Extra token ids that end generation (the model's EOS ids always do, unless ignoreEos). */
  stopTokenIds: number[];
  ignoreEos: boolean;
}

export const DEFAULT_GENERATION: GenerationConfig = {
  maxNewTokens: 128,
  temperature: 0,
  topK: 0,
  topP: 1,
  minP: 0,
  repetitionPenalty: 1,
  seed: 0,
  stop: [],
  stopTokenIds: [],
  ignoreEos: false,
};

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
  check(Number.isSafeInteger(c.seed), "seed", "an integer");
  check(Array.isArray(c.stop) && c.stop.every((s) => typeof s === "string" && s.length > 0), "stop", "a list of non-empty strings");
  check(Array.isArray(c.stopTokenIds) && c.stopTokenIds.every((t) => Number.isInteger(t) && t >= 0), "stopTokenIds", "a list of token ids");
  check(typeof c.ignoreEos === "boolean", "ignoreEos", "a boolean");
  return c;
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

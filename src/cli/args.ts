// Command-line flags: node:util's parseArgs (strict: unknown flags are errors) plus
// typed readers that name the flag when a value is wrong.

import { parseArgs, type ParseArgsConfig } from "node:util";

/** A mistake in how the command was called or what it was pointed at: exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export type Options = NonNullable<ParseArgsConfig["options"]>;

export type FlagValues = Record<string, string | boolean | (string | boolean)[] | undefined>;

export function parse(argv: string[], options: Options, positionals = false): { values: FlagValues; positionals: string[] } {
  try {
    return parseArgs({ args: argv, options: { help: { type: "boolean", short: "h" }, ...options }, allowPositionals: positionals, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message.split("\n")[0]);
  }
}

export function intFlag(values: Record<string, unknown>, name: string, min: number, fallback?: number): number | undefined {
  const raw = values[name];
  if (raw === undefined) return fallback;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) throw new UsageError(`--${name} must be an integer >= ${min}, got "${raw}"`);
  return v;
}

export function numFlag(values: Record<string, unknown>, name: string, min: number, max: number): number | undefined {
  const raw = values[name];
  if (raw === undefined) return undefined;
  const v = Number(raw);
  if (!Number.isFinite(v) || v < min || v > max) throw new UsageError(`--${name} must be a number in [${min}, ${max}], got "${raw}"`);
  return v;
}

/** "1,2,3" -> [1, 2, 3] */
export function idList(raw: string, name: string): number[] {
  const parts = raw.split(",").map((s) => s.trim());
  const ids = parts.map(Number);
  if (parts.some((p) => p === "") || ids.some((v) => !Number.isInteger(v) || v < 0)) {
    throw new UsageError(`--${name} must be comma-separated token ids, got "${raw}"`);
  }
  return ids;
}

/** Shows loading progress on a terminal; silent when stderr is a pipe. */
export function progressPrinter(label: string): (fraction: number, what: string) => void {
  if (!process.stderr.isTTY) return () => {};
  return (fraction, what) => {
    process.stderr.write(`\r\x1b[K${label}: ${what} ${Math.round(fraction * 100)}%`);
    if (fraction >= 1) process.stderr.write("\r\x1b[K");
  };
}

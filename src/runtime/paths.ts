// Where the native libraries and the default model pair live: in the source tree when
// run from source, beside the executable when run as `dist/specinfer` (bun build
// --compile, scripts/compile.mjs), so the executable needs no source tree.

import { dirname, join } from "node:path";

/** Inside a compiled executable every module's import.meta.dir starts with /$bunfs/. */
export const IS_COMPILED = import.meta.dir.startsWith("/$bunfs/");

/** The source tree's root (this file is src/runtime/paths.ts), or the executable's folder. */
const ROOT = IS_COMPILED ? dirname(process.execPath) : join(import.meta.dir, "..", "..");

/** zig-out/lib in the source tree; lib/ beside the executable. */
export const NATIVE_LIB_DIR = IS_COMPILED ? join(ROOT, "lib") : join(ROOT, "zig-out", "lib");

/** The vendored trained pair (models/MODEL_CARD.md): target and draft.
 *  @example
 *  const llm = await LLM.load(DEFAULT_MODEL, { ssms: [DEFAULT_DRAFT] }); // what LLM.load() does
 */
export const DEFAULT_MODEL = join(ROOT, "models", "llama-shakespeare-8m");
export const DEFAULT_DRAFT = join(ROOT, "models", "llama-shakespeare-1.4m-draft");

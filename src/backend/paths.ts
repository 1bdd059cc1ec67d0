// Where the install lives: the source tree when run from source, the executable's folder
// when run as `dist/specinfer` (bun build --compile, scripts/compile.mjs), so the
// executable needs no source tree.

import { dirname, join } from "node:path";

/** Inside a compiled executable every module's import.meta.dir starts with /$bunfs/. */
export const IS_COMPILED = import.meta.dir.startsWith("/$bunfs/");

/** The source tree's root (this file is src/backend/paths.ts), or the executable's folder. */
export const INSTALL_ROOT = IS_COMPILED ? dirname(process.execPath) : join(import.meta.dir, "..", "..");

/** zig-out/lib in the source tree; lib/ beside the executable. */
export const NATIVE_LIB_DIR = IS_COMPILED ? join(INSTALL_ROOT, "lib") : join(INSTALL_ROOT, "zig-out", "lib");

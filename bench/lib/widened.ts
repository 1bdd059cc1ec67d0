// The trained pair widened to TinyLlama-1.1B cost without changing its function
// (src/model/widen.ts), written once into a models folder (git-ignored).

import { existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import type { WriteDType } from "../../src/model/encoding";
import { widenModel, type WidenSpec } from "../../src/model/widen";
import { DEFAULT_DRAFT, DEFAULT_MODEL } from "../../src/runtime/paths";

/** Fixed trees compared on the widened pair, besides the default 1,1,1 (bench:cpu and
 *  bench:serve both run them). */
export const WIDENED_TREES = ["1,1,1,1", "2,1,1,1", "dynamic:16"];

export interface WidenSpecs {
  target: WidenSpec;
  draft: WidenSpec;
  dtype: WriteDType;
}

/** Target: the trained 8M widened x7 (hidden 2016, 42 heads, FFN 6272) plus 16
 *  zero-output layers = 22 layers, ~1.09B parameters read per token like TinyLlama-1.1B.
 *  Draft: the 1.4M widened x4 plus one layer, ~11M read per token (~1/100). Quick: a
 *  small widening for a fast run. */
export function widenSpecs(quick: boolean, dtype: WriteDType): WidenSpecs {
  return quick
    ? { target: { width: 2, extraLayers: 2 }, draft: { width: 1 }, dtype }
    : { target: { width: 7, extraLayers: 16 }, draft: { width: 4, extraLayers: 1 }, dtype };
}

function widened(src: string, name: string, spec: WidenSpec, dtype: WriteDType, dir: string, log: (msg: string) => void): string {
  const tag = `${spec.width}x-${spec.heads ?? spec.width}h-${spec.ffn ?? spec.width}f-${spec.extraLayers ?? 0}l`;
  const path = join(dir, `${name}-wide-${tag}-${dtype}.gguf`);
  if (!existsSync(path)) {
    mkdirSync(dir, { recursive: true });
    log(`widening ${src} -> ${path}`);
    const t0 = performance.now();
    widenModel(src, path, spec, { dtype, tokenizerFrom: join(src, "model.gguf"), name: `${name} widened` });
    log(`  ${(statSync(path).size / 1e9).toFixed(2)} GB in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }
  return path;
}

/** Paths of the widened target and draft GGUFs, written on first use. */
export function widenedPair(specs: WidenSpecs, dir: string, log: (msg: string) => void): { target: string; draft: string } {
  return {
    target: widened(DEFAULT_MODEL, "llama-shakespeare-8m", specs.target, specs.dtype, dir, log),
    draft: widened(DEFAULT_DRAFT, "llama-shakespeare-1.4m-draft", specs.draft, specs.dtype, dir, log),
  };
}

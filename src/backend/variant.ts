// Which build of the CPU library this machine runs, chosen at load time as llama.cpp
// chooses among its ggml-cpu variants: the AVX-512 build where the CPU has every
// feature it was compiled for, else the portable x86-64-v3 build (build.zig builds
// both). SPECINFER_CPU_VARIANT=portable|avx512 forces one; auto (the default) chooses.

import { readFileSync } from "node:fs";
import { BackendError } from "./backend.ts";

export type CpuVariant = "avx512" | "portable";

/** x86-64-v3 as /proc/cpuinfo names it. LZCNT ("abm") is left out: some hypervisors
 *  hide that flag on CPUs that have it. */
export const PORTABLE_FLAGS = ["avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"] as const;

/** What the AVX-512 build assumes beyond that: x86-64-v4 plus VNNI (scripts/compile.mjs). */
export const AVX512_FLAGS = ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"] as const;

const SETTINGS = ["auto", "portable", "avx512"] as const;

function missing(flags: ReadonlySet<string>, wanted: readonly string[]): string[] {
  return wanted.filter((f) => !flags.has(f));
}

/** The variant for `setting` (SPECINFER_CPU_VARIANT) on a CPU with `flags` (null:
 *  unknown, so only the portable build is safe). Refuses a variant this CPU cannot run. */
export function chooseCpuVariant(setting: string | undefined, flags: ReadonlySet<string> | null): CpuVariant {
  const want = setting?.trim().toLowerCase() || "auto";
  if (!(SETTINGS as readonly string[]).includes(want)) {
    throw new BackendError("load", -1, `SPECINFER_CPU_VARIANT=${setting} is not one of ${SETTINGS.join(", ")}`);
  }
  const lacks512 = flags ? missing(flags, AVX512_FLAGS) : [...AVX512_FLAGS];
  if (want === "avx512" && lacks512.length > 0) {
    throw new BackendError("load", -1, `SPECINFER_CPU_VARIANT=avx512, but this CPU lacks ${lacks512.join(", ")}`);
  }
  const variant: CpuVariant = want === "avx512" || (want === "auto" && lacks512.length === 0) ? "avx512" : "portable";
  const lacksV3 = flags ? missing(flags, PORTABLE_FLAGS) : [];
  if (variant === "portable" && lacksV3.length > 0) {
    throw new BackendError(
      "load",
      -1,
      `this CPU lacks ${lacksV3.join(", ")}, which the portable (x86-64-v3) kernels need; ` +
        "point SPECINFER_CPU_LIB at a library built on this machine (zig-out/lib/libspecinfer_cpu.so)",
    );
  }
  return variant;
}

/** The CPU feature flags of /proc/cpuinfo, or null where it cannot be read. */
export function readCpuFlags(cpuinfo = "/proc/cpuinfo"): Set<string> | null {
  try {
    const line = readFileSync(cpuinfo, "utf8").match(/^flags\s*:(.*)$/m);
    return line ? new Set(line[1]!.trim().split(/\s+/)) : null;
  } catch {
    return null;
  }
}

/** This process's variant: SPECINFER_CPU_VARIANT on this CPU. */
export function cpuVariant(): CpuVariant {
  return chooseCpuVariant(process.env.SPECINFER_CPU_VARIANT, readCpuFlags());
}

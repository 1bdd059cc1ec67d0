// The CPU library is built twice (build.zig): for AVX-512 and portable x86-64-v3.
// Which one loads is chosen from /proc/cpuinfo's flags or SPECINFER_CPU_VARIANT, and
// both must compute the same model: PyTorch's greedy continuation, the same logits.

import { afterEach, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { cpuLibraryPath } from "../../src/backend/cpu.ts";
import { chooseCpuVariant, readCpuFlags } from "../../src/backend/variant.ts";
import { avx512InstructionCount, hasObjdump } from "../helpers/evex.ts";

const ROOT = join(import.meta.dir, "..", "..");

/** Flag lines as /proc/cpuinfo prints them on a few generations (abridged). */
const HASWELL = "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt xsave avx f16c bmi1 avx2 bmi2";
const SKYLAKE_SP = `${HASWELL} avx512f avx512dq avx512cd avx512bw avx512vl`;
const CASCADE_LAKE = `${SKYLAKE_SP} avx512_vnni`;
const ZEN4 = `${HASWELL} avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni`;
const SANDY_BRIDGE = "fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt xsave avx";
const flags = (line: string) => new Set(line.split(" "));

describe("chooseCpuVariant", () => {
  test("auto takes the AVX-512 build only on CPUs with AVX-512 VNNI and the rest of x86-64-v4", () => {
    expect(chooseCpuVariant(undefined, flags(CASCADE_LAKE))).toBe("avx512");
    expect(chooseCpuVariant("auto", flags(ZEN4))).toBe("avx512");
    expect(chooseCpuVariant(undefined, flags(SKYLAKE_SP))).toBe("portable");
    expect(chooseCpuVariant("", flags(HASWELL))).toBe("portable");
  });

  test("unknown CPU flags (no /proc/cpuinfo) mean the portable build", () => {
    expect(chooseCpuVariant(undefined, null)).toBe("portable");
  });

  test("SPECINFER_CPU_VARIANT=portable forces the portable build on an AVX-512 CPU, in any case", () => {
    expect(chooseCpuVariant("portable", flags(ZEN4))).toBe("portable");
    expect(chooseCpuVariant(" Portable ", flags(ZEN4))).toBe("portable");
  });

  test("forcing avx512 on a CPU without it is refused, naming what is missing", () => {
    expect(chooseCpuVariant("avx512", flags(CASCADE_LAKE))).toBe("avx512");
    expect(() => chooseCpuVariant("avx512", flags(SKYLAKE_SP))).toThrow(/lacks avx512_vnni$/);
    expect(() => chooseCpuVariant("avx512", null)).toThrow(/lacks avx512f, /);
  });

  test("an unknown setting is refused, naming the variable and the choices", () => {
    expect(() => chooseCpuVariant("avx2", flags(ZEN4))).toThrow("SPECINFER_CPU_VARIANT=avx2 is not one of auto, portable, avx512");
  });

  test("a CPU older than x86-64-v3 is refused with the missing features named, not left to crash", () => {
    expect(() => chooseCpuVariant(undefined, flags(SANDY_BRIDGE))).toThrow(/lacks avx2, fma, f16c, bmi1, bmi2, movbe, which/);
  });
});

describe("readCpuFlags", () => {
  test("reads the first flags line of a cpuinfo file; an unreadable one gives null", () => {
    const dir = mkdtempSync(join(tmpdir(), "specinfer-cpuinfo-"));
    const file = join(dir, "cpuinfo");
    writeFileSync(file, `processor\t: 0\nflags\t\t: ${ZEN4}\nbugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: ${ZEN4}\n`);
    expect(readCpuFlags(file)).toEqual(flags(ZEN4));
    expect(readCpuFlags(join(dir, "missing"))).toBeNull();
    rmSync(dir, { recursive: true });
  });
});

describe("cpuLibraryPath", () => {
  const saved = { variant: process.env.SPECINFER_CPU_VARIANT, lib: process.env.SPECINFER_CPU_LIB };
  afterEach(() => {
    for (const [key, value] of [["SPECINFER_CPU_VARIANT", saved.variant], ["SPECINFER_CPU_LIB", saved.lib]] as const) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  });

  test("follows SPECINFER_CPU_VARIANT; SPECINFER_CPU_LIB overrides it", () => {
    delete process.env.SPECINFER_CPU_LIB;
    process.env.SPECINFER_CPU_VARIANT = "portable";
    expect(cpuLibraryPath()).toBe(join(ROOT, "zig-out", "lib", "libspecinfer_cpu_v3.so"));
    process.env.SPECINFER_CPU_VARIANT = "bogus";
    expect(() => cpuLibraryPath()).toThrow("SPECINFER_CPU_VARIANT=bogus");
    process.env.SPECINFER_CPU_LIB = "/opt/custom.so";
    expect(cpuLibraryPath()).toBe("/opt/custom.so");
  });
});

/** `specinfer logits` on PyTorch's first reference prompt with the given build forced. */
function logitsWith(variant: string, prompt: number[]): { top: { id: number; logit: number }[]; greedy: number[] } {
  const model = join(ROOT, "models", "llama-shakespeare-8m");
  const args = ["src/cli.ts", "logits", "--model", model, "--tokens", prompt.join(","), "--top", "40", "--greedy", "32", "--json"];
  const inherited = Object.entries(process.env).filter(([key]) => key !== "SPECINFER_CPU_LIB");
  const env = { ...Object.fromEntries(inherited), SPECINFER_CPU_VARIANT: variant };
  const r = spawnSync(process.execPath, args, { cwd: ROOT, env, encoding: "utf8", timeout: 120_000 });
  if (r.status !== 0) throw new Error(`logits with SPECINFER_CPU_VARIANT=${variant} failed (${r.status ?? r.signal}): ${r.stderr}`);
  return JSON.parse(r.stdout);
}

const cpuHasAvx512 = (() => {
  try {
    return chooseCpuVariant("auto", readCpuFlags()) === "avx512";
  } catch {
    return false;
  }
})();

describe("both builds", () => {
  const reference = JSON.parse(readFileSync(join(ROOT, "models", "reference-greedy.json"), "utf8"))[0] as {
    input_ids: number[];
    target_greedy: number[];
  };

  test.skipIf(!cpuHasAvx512)("portable and AVX-512 builds give PyTorch's greedy continuation and the same top logits (needs an AVX-512 CPU)", () => {
    const portable = logitsWith("portable", reference.input_ids);
    const avx512 = logitsWith("avx512", reference.input_ids);
    expect(portable.greedy).toEqual(reference.target_greedy);
    expect(avx512.greedy).toEqual(reference.target_greedy);
    expect(avx512.top.map((t) => t.id)).toEqual(portable.top.map((t) => t.id));
    const worst = Math.max(...avx512.top.map((t, i) => Math.abs(t.logit - portable.top[i]!.logit)));
    expect(worst).toBeLessThan(1e-4);
  });

  test.skipIf(!hasObjdump)("the portable build (and the CUDA host library, where built) has no AVX-512 instruction, the AVX-512 build has them (needs objdump)", () => {
    expect(avx512InstructionCount(join(ROOT, "zig-out", "lib", "libspecinfer_cpu_v3.so"))).toBe(0);
    const cuda = join(ROOT, "zig-out", "lib", "libspecinfer_cuda.so");
    if (existsSync(cuda)) expect(avx512InstructionCount(cuda)).toBe(0);
    if (cpuHasAvx512) expect(avx512InstructionCount(join(ROOT, "zig-out", "lib", "libspecinfer_cpu.so"))).toBeGreaterThan(1000);
  });
});

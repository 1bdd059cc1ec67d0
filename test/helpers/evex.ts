// Counting AVX-512 instructions in a shared library, to check which CPUs it can run on.

import { spawnSync } from "node:child_process";

export const hasObjdump = spawnSync("objdump", ["--version"]).status === 0;

/** AVX-512 instructions in `lib`'s code. In 64-bit mode an instruction starting with
 *  byte 0x62 is EVEX, i.e. AVX-512; an objdump line "addr:<TAB>bytes<TAB>mnemonic"
 *  starts an instruction, lines without a mnemonic continue a long one. */
export function avx512InstructionCount(lib: string): number {
  const r = spawnSync("objdump", ["-d", lib], { encoding: "utf8", maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new Error(`objdump -d ${lib} failed: ${r.stderr}`);
  return r.stdout.split("\n").filter((line) => /^\s*[0-9a-f]+:\t62 ([0-9a-f]{2} )*\t\S|%zmm|%k[0-7]/.test(line)).length;
}

// The op table (src/backend/abi.ts) against the C header (ffi/specinfer.h): every si_
// function the header declares is bound with the same argument and return types, and
// nothing else is; the derived Backend methods check their argument count and name the
// op in errors. The @ts-expect-error lines make `npm run typecheck` prove that a wrong
// argument count or type does not compile.

import { afterAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { LIBRARY, OPS, SYMBOLS, type FFIName } from "../../src/backend/abi.ts";
import { type Backend, BackendError, DType } from "../../src/backend/backend.ts";
import { CpuBackend } from "../../src/backend/cpu.ts";

const HEADER = readFileSync(join(import.meta.dir, "../../ffi/specinfer.h"), "utf8");

/** The FFI type a C parameter or return type crosses as. */
function ffiOf(cType: string): FFIName {
  const t = cType.replace(/\bconst\b/g, "").replace(/\s+/g, " ").trim();
  if (t.includes("*")) return "ptr";
  const scalar: Record<string, FFIName> = { int32_t: "i32", int64_t: "i64", uint64_t: "u64", float: "f32", double: "f64", void: "void" };
  const hit = scalar[t];
  if (!hit) throw new Error(`specinfer.h: no FFI type for C type "${cType}"`);
  return hit;
}

interface Declared {
  args: FFIName[];
  returns: FFIName;
}

/** Every `si_*` function prototype in the header (comments stripped). */
function declaredFunctions(header: string): Map<string, Declared> {
  const code = header.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "");
  const found = new Map<string, Declared>();
  for (const m of code.matchAll(/([A-Za-z_][\w\s]*?\**)\s*\b(si_\w+)\s*\(([^)]*)\)\s*;/g)) {
    const [, ret, name, params] = m;
    const returns = ret.includes("char") && ret.includes("*") ? "cstring" : ffiOf(ret);
    const args = params.trim() === "void" || params.trim() === ""
      ? []
      : params.split(",").map((p) => {
          // Drop the parameter name; keep its stars with the type.
          const typed = p.trim().replace(/\b\w+$/, "");
          return ffiOf(typed);
        });
    found.set(name, { args, returns });
  }
  return found;
}

describe("op table matches ffi/specinfer.h", () => {
  const declared = declaredFunctions(HEADER);

  test("the header parser sees the functions it should (sanity check of the test itself)", () => {
    expect(declared.get("si_create")).toEqual({ args: ["i32", "i32"], returns: "ptr" });
    expect(declared.get("si_last_error")).toEqual({ args: ["ptr"], returns: "cstring" });
    expect(declared.get("si_kv_move")?.args).toEqual(["ptr", "ptr", "i32", "i32", "i64", "i32", "ptr", "i32", "ptr", "ptr", "i32"]);
    expect(declared.size).toBeGreaterThan(20);
  });

  test("every declared si_ function is bound with the header's argument and return types", () => {
    const mismatches: string[] = [];
    for (const [name, want] of declared) {
      const got = SYMBOLS[name];
      if (!got) mismatches.push(`${name}: declared in specinfer.h, missing from abi.ts`);
      else if (JSON.stringify(got) !== JSON.stringify(want)) {
        mismatches.push(`${name}: header (${want.args.join(", ")}) -> ${want.returns}, table (${got.args.join(", ")}) -> ${got.returns}`);
      }
    }
    expect(mismatches).toEqual([]);
  });

  test("every bound symbol is declared in the header", () => {
    expect(Object.keys(SYMBOLS).filter((name) => !declared.has(name))).toEqual([]);
  });

  test("ops and library functions do not share a symbol, and op symbols are unique", () => {
    const opSymbols = Object.values(OPS).map((op) => op.symbol as string);
    expect(new Set(opSymbols).size).toBe(opSymbols.length);
    expect(opSymbols.filter((s) => s in LIBRARY)).toEqual([]);
  });
});

describe("derived backend ops", () => {
  const cpu = CpuBackend.create({ threads: 1 });
  afterAll(() => cpu.close());

  test("every op of the table is a method of the backend", () => {
    for (const name of Object.keys(OPS)) expect(typeof (cpu as unknown as Record<string, unknown>)[name]).toBe("function");
  });

  test("a wrong argument count is refused with the op's name and its argument list", () => {
    const loose = cpu as unknown as Record<string, (...a: number[]) => void>;
    expect(() => loose.argmax(0, 1)).toThrow(BackendError);
    expect(() => loose.argmax(0, 1)).toThrow(/^argmax failed .*takes 4 arguments \(x:ptr, rows:i32, n:i32, out:ptr\), got 2/);
    expect(() => loose.attention(...Array(19).fill(0))).toThrow(/attention failed .*takes 17 to 18 arguments/);
  });

  test("a native failure names the op and carries the library's message", () => {
    const out = cpu.alloc(64);
    expect(() => cpu.argmax(0, 1, 8, out.ptr)).toThrow(/^argmax failed \(code 1\): si_argmax: x is NULL/);
    cpu.free(out);
  });

  test("an optional trailing pointer may be left out, and 0 passes as NULL", () => {
    // rmsnorm has no optional pointer; layernorm's bias 0 must reach Zig as NULL.
    const x = cpu.alloc(4 * 4);
    const w = cpu.alloc(4 * 4);
    new Float32Array(x.host!).set([1, 2, 3, 4]);
    new Float32Array(w.host!).set([1, 1, 1, 1]);
    cpu.layernorm(x.ptr, w.ptr, 0, 1, 4, 0, x.ptr);
    const y = Array.from(new Float32Array(x.host!));
    const sd = Math.sqrt(1.25);
    y.forEach((v, i) => expect(v).toBeCloseTo((i + 1 - 2.5) / sd, 5));
    cpu.free(x);
    cpu.free(w);
  });
});

/** Never called: `npm run typecheck` fails if any of these lines compiles. */
export function typeErrorsOfTheDerivedOps(be: Backend): void {
  // @ts-expect-error too few arguments
  be.argmax(0, 1, 2);
  // @ts-expect-error too many arguments
  be.softmax(0, 1, 2, 1, 5);
  // @ts-expect-error a string where a row count goes
  be.argmax(0, "rows", 2, 0);
  // @ts-expect-error a number that is not a DType
  be.matmul(0, 1, 32, 0, 7 as 7, 32, 0, 0);
  be.matmul(0, 1, 32, 0, DType.Q8_0, 32, 0, 0);
}

// The Zig unit tests of ffi/ (thread pool, contention governor, SIMD helpers) run as part
// of the suite, through the same Zig the build uses.
import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { join } from "node:path";

test("Zig unit tests of ffi/ pass (pool chunks, late workers, contention governor, simd)", () => {
  const root = join(import.meta.dir, "..", "..");
  const r = spawnSync("node", [join(root, "scripts", "build-native.mjs"), "test"], { cwd: root, encoding: "utf8" });
  const out = `${r.stdout}\n${r.stderr}`;
  expect(r.status, out).toBe(0);
  // A cached result prints "run test cached"; a fresh one "run test N passed".
  expect(out).toMatch(/run test (cached|\d+ passed)/);
});

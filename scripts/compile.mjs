#!/usr/bin/env node
// npm run compile: the standalone executable dist/specinfer (bun build --compile) and,
// beside it, what it loads from disk:
//
//   dist/specinfer                  the CLI with the Bun runtime inside
//   dist/lib/libspecinfer_cpu.so    AVX-512 build (x86-64-v4 + VNNI)
//   dist/lib/libspecinfer_cpu_v3.so portable build (any x86-64-v3 CPU); the executable
//                                   picks one at run time (src/backend/variant.ts)
//   dist/lib/libspecinfer_cuda.so   where nvcc built it (static cudart: needs only a driver)
//   dist/models/...                 the default model pair (safetensors + tokenizer)
//
// The libraries are built here for fixed CPU targets, not for this machine, into
// zig-out/dist. Copy the whole dist/ folder to move the executable.
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
const libBuild = join(root, "zig-out", "dist");

/** What the AVX-512 build may use: variant.ts's AVX512_FLAGS must match. */
const AVX512_CPU = "x86_64_v4+avx512vnni";
const LIBS = ["libspecinfer_cpu.so", "libspecinfer_cpu_v3.so", "libspecinfer_cuda.so"];
const OPTIONAL_LIBS = new Set(["libspecinfer_cuda.so"]);
const MODELS = ["llama-shakespeare-8m", "llama-shakespeare-1.4m-draft"];
const MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];
/** Worker entry points: each is bundled at the executable's root, where
 *  `new URL("./worker.ts", import.meta.url)` points inside the executable. */
const WORKERS = ["src/runtime/worker.ts", "src/runtime/draft-worker.ts"];

function die(msg) {
  console.error(`compile: ${msg}`);
  process.exit(1);
}

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit" });
  if (r.error) die(`could not run ${cmd}: ${r.error.message}`);
  if (r.status !== 0) die(`\`${cmd} ${args.join(" ")}\` failed (exit ${r.status ?? r.signal})`);
}

function copy(from, to) {
  mkdirSync(dirname(to), { recursive: true });
  copyFileSync(from, to);
}

const bun = join(root, "node_modules", ".bin", "bun");
if (!existsSync(bun)) die("node_modules/.bin/bun is missing: run `npm install`");

run(process.execPath, [join(root, "scripts", "build-native.mjs"), `-Dcpu=${AVX512_CPU}`, "--prefix", libBuild]);

rmSync(dist, { recursive: true, force: true });
mkdirSync(dist);

// Bun names the main bundle after --outfile at the root of its virtual file system and
// each further entry point by its path from the entries' common folder, so one-line
// entry files side by side put every worker at the root.
const entries = mkdtempSync(join(tmpdir(), "specinfer-compile-"));
try {
  const main = join(entries, "specinfer.ts");
  writeFileSync(main, `import ${JSON.stringify(join(root, "src", "cli.ts"))};\n`);
  const workers = WORKERS.map((w) => {
    const entry = join(entries, basename(w));
    writeFileSync(entry, `import ${JSON.stringify(join(root, w))};\n`);
    return entry;
  });
  // The executable behaves the same in every folder: no .env or bunfig.toml (whose
  // preload could run code) is read from where it is started.
  const noAutoload = ["--no-compile-autoload-dotenv", "--no-compile-autoload-bunfig"];
  run(bun, ["build", "--compile", ...noAutoload, main, ...workers, "--outfile", join(dist, "specinfer")]);
} finally {
  rmSync(entries, { recursive: true, force: true });
}

for (const lib of LIBS) {
  const from = join(libBuild, "lib", lib);
  if (existsSync(from)) copy(from, join(dist, "lib", lib));
  else if (!OPTIONAL_LIBS.has(lib)) die(`${from} was not built`);
}
for (const model of MODELS) {
  for (const file of MODEL_FILES) {
    const from = join(root, "models", model, file);
    if (!existsSync(from)) die(`${from} is missing`);
    copy(from, join(dist, "models", model, file));
  }
}

const mb = (p) => (statSync(p).size / 2 ** 20).toFixed(1);
console.log(`compile: dist/specinfer (${mb(join(dist, "specinfer"))} MiB) with lib/ and models/ beside it`);

// `npm run compile` makes dist/: the executable with its libraries and the default
// model pair beside it. Copied to an empty folder outside the source tree and run with
// no bun, node or zig on PATH, `generate` and `serve` must work from the copy alone.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { chooseCpuVariant, readCpuFlags } from "../src/backend/variant.ts";
import { avx512InstructionCount, hasObjdump } from "./helpers/evex.ts";

const ROOT = join(import.meta.dir, "..");
const RUN_LIMIT_MS = 90_000;

/** PyTorch's greedy continuation of the first reference prompt (models/MODEL_CARD.md). */
const reference = JSON.parse(readFileSync(join(ROOT, "models", "reference-greedy.json"), "utf8"))[0] as {
  prompt: string;
  target_greedy: number[];
};

/** PATH without every folder that holds a bun, node or zig. */
function pathWithoutToolchains(): string {
  const tools = ["bun", "node", "zig"];
  const dirs = (process.env.PATH ?? "").split(delimiter).filter((d) => d && !tools.some((t) => existsSync(join(d, t))));
  return dirs.join(delimiter);
}

const cpuHasAvx512 = (() => {
  try {
    return chooseCpuVariant("auto", readCpuFlags()) === "avx512";
  } catch {
    return false;
  }
})();

let home = "";
let exe = "";
let env: Record<string, string> = {};

beforeAll(() => {
  const r = spawnSync("node", [join(ROOT, "scripts", "compile.mjs")], { cwd: ROOT, encoding: "utf8", timeout: 540_000 });
  if (r.status !== 0) throw new Error(`npm run compile failed (${r.status ?? r.signal}):\n${r.stdout}\n${r.stderr}`);
  home = mkdtempSync(join(tmpdir(), "specinfer-exe-"));
  cpSync(join(ROOT, "dist"), home, { recursive: true });
  exe = join(home, "specinfer");
  env = { PATH: pathWithoutToolchains(), HOME: home };
}, 600_000);

afterAll(() => {
  if (home) rmSync(home, { recursive: true, force: true });
});

/** Runs the copied executable to completion; a hang fails with a message, not a timeout. */
function runExe(args: string[], extraEnv: Record<string, string> = {}, cwd = home) {
  const r = spawnSync(exe, args, { cwd, env: { ...env, ...extraEnv }, encoding: "utf8", timeout: RUN_LIMIT_MS });
  if (r.error || r.signal) {
    throw new Error(`specinfer ${args[0]} did not finish within ${RUN_LIMIT_MS / 1000} s (${r.error?.message ?? r.signal}): ${r.stderr}`);
  }
  return r;
}

/** runExe that also fails on a non-zero exit, showing stderr. */
function runOk(args: string[], extraEnv: Record<string, string> = {}) {
  const r = runExe(args, extraEnv);
  if (r.status !== 0) throw new Error(`specinfer ${args[0]} exited ${r.status}: ${r.stderr}`);
  return r;
}

describe("the copied executable", () => {
  test("sits outside the source tree with no bun, node or zig on its PATH", () => {
    expect(home.startsWith(ROOT)).toBe(false);
    for (const dir of env.PATH!.split(delimiter).filter(Boolean)) {
      for (const tool of ["bun", "node", "zig"]) expect(existsSync(join(dir, tool))).toBe(false);
    }
    expect(spawnSync("sh", ["-c", "command -v bun || command -v node || command -v zig"], { env }).status).not.toBe(0);
  });

  const variants = [
    { variant: "portable", runs: true, needs: "" },
    { variant: "avx512", runs: cpuHasAvx512, needs: " (needs an AVX-512 VNNI CPU)" },
  ];
  for (const { variant, runs, needs } of variants) {
    test.skipIf(!runs)(`generate with the ${variant} CPU build gives PyTorch's greedy continuation${needs}`, () => {
      const args = ["generate", "--prompt", reference.prompt, "--temperature", "0", "--max-tokens", "32", "--ignore-eos", "--json"];
      const r = runOk(args, { SPECINFER_CPU_VARIANT: variant });
      expect(JSON.parse(r.stdout).tokens).toEqual(reference.target_greedy);
    });
  }

  test.skipIf(!hasObjdump)("ships a portable CPU library (and CUDA library, where built) without AVX-512 instructions (needs objdump)", () => {
    expect(avx512InstructionCount(join(home, "lib", "libspecinfer_cpu_v3.so"))).toBe(0);
    const cuda = join(home, "lib", "libspecinfer_cuda.so");
    if (existsSync(cuda)) expect(avx512InstructionCount(cuda)).toBe(0);
  });

  const hasNvcc = spawnSync("nvcc", ["--version"]).status === 0;
  test.skipIf(!hasNvcc)("--backend cuda loads the CUDA library from the copy: PyTorch's continuation on a GPU, else a CUDA error (needs nvcc at compile time)", () => {
    const args = ["generate", "--backend", "cuda", "--prompt", reference.prompt, "--temperature", "0", "--max-tokens", "32", "--ignore-eos", "--json"];
    const r = runExe(args);
    if (r.status === 0) expect(JSON.parse(r.stdout).tokens).toEqual(reference.target_greedy);
    else expect(r.stderr).toMatch(/^specinfer: create failed .*CUDA/);
  });

  test("an unknown SPECINFER_CPU_VARIANT stops it with a message naming the variable", () => {
    const r = runExe(["generate", "--prompt", "ROMEO:", "--max-tokens", "2"], { SPECINFER_CPU_VARIANT: "sse2" });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain("SPECINFER_CPU_VARIANT=sse2 is not one of auto, portable, avx512");
  });

  test("ignores a .env and a bunfig.toml (preload) in the folder it is started from", () => {
    const elsewhere = join(home, "elsewhere");
    mkdirSync(elsewhere);
    writeFileSync(join(elsewhere, ".env"), "SPECINFER_CPU_VARIANT=sse2\n");
    writeFileSync(join(elsewhere, "preload.ts"), 'console.log("preloaded");\n');
    writeFileSync(join(elsewhere, "bunfig.toml"), 'preload = ["./preload.ts"]\n');
    const r = runExe(["generate", "--prompt", "ROMEO:", "--max-tokens", "2", "--temperature", "0"], {}, elsewhere);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).not.toContain("preloaded");
  });

  test("serve answers /health and a completion, with its library and weights mapped from the copy", async () => {
    const child = spawn(exe, ["serve", "--port", "0"], { cwd: home, env, stdio: ["ignore", "ignore", "pipe"] });
    try {
      const base = await listeningUrl(child);
      await untilHealthy(base);
      const models = (await (await fetch(`${base}/v1/models`)).json()) as { data: { id: string }[] };
      const res = await fetch(`${base}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: models.data[0]!.id, prompt: reference.prompt, max_tokens: 32, temperature: 0 }),
      });
      expect(res.status).toBe(200);
      const body = (await res.json()) as { choices: { text: string }[]; usage: { completion_tokens: number } };
      expect(body.usage.completion_tokens).toBe(32);
      const generated = runOk(["generate", "--prompt", reference.prompt, "--temperature", "0", "--max-tokens", "32", "--json"]);
      expect(body.choices[0]!.text).toBe(JSON.parse(generated.stdout).text);

      const mapped = readFileSync(`/proc/${child.pid}/maps`, "utf8")
        .split("\n")
        .map((line) => line.split(/\s+/).slice(5).join(" "))
        .filter((path) => /libspecinfer_|\.safetensors$/.test(path));
      expect(mapped.some((p) => p.includes("libspecinfer_cpu"))).toBe(true);
      expect(mapped.some((p) => p.endsWith("model.safetensors"))).toBe(true);
      for (const path of mapped) expect(path.startsWith(home)).toBe(true);
    } finally {
      await stop(child);
    }
  });
});

/** The base URL from serve's "listening on http://HOST:PORT/v1" line. */
function listeningUrl(child: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let err = "";
    const timer = setTimeout(() => reject(new Error(`serve printed no "listening on" line within 30 s: ${err}`)), 30_000);
    child.stderr!.on("data", (chunk: Buffer) => {
      err += chunk.toString();
      const m = err.match(/listening on (http:\/\/\S+?)\/v1/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    child.on("exit", (code) => reject(new Error(`serve exited (${code}) before listening: ${err}`)));
  });
}

async function untilHealthy(base: string): Promise<void> {
  const deadline = Date.now() + RUN_LIMIT_MS;
  let last = 0;
  while (Date.now() < deadline) {
    last = (await fetch(`${base}/health`)).status;
    if (last === 200) return;
    await Bun.sleep(100);
  }
  throw new Error(`/health still answered ${last} after ${RUN_LIMIT_MS / 1000} s`);
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

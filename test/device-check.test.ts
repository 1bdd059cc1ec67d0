// scripts/device-check.sh in its dry-run mode (the CPU parts of the GPU check): it must
// build, load every GPU test file (each reports itself skipped without a GPU) and write
// its JSON summary, so the script is known to work before a GPU machine runs it.

import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const ROOT = join(import.meta.dir, "..");

interface Summary {
  dryRun: boolean;
  ok: boolean;
  gpuTests: string;
  steps: { name: string; status: string }[];
}

test("device-check.sh DRY_RUN=1: builds, loads every GPU test file, and writes a JSON summary of its steps", () => {
  const out = mkdtempSync(join(tmpdir(), "si-device-check-"));
  try {
    const r = spawnSync("bash", ["scripts/device-check.sh"], {
      cwd: ROOT,
      env: { ...process.env, OUT: out, DRY_RUN: "1" },
      encoding: "utf8",
      timeout: 240_000,
    });
    expect(r.status).toBe(0);
    const summary = JSON.parse(readFileSync(join(out, "device-check.json"), "utf8")) as Summary;
    expect(summary.dryRun).toBe(true);
    const status = Object.fromEntries(summary.steps.map((s) => [s.name, s.status]));
    expect(status.build).toBe("pass");
    expect(status["gpu-tests"]).toBe("pass");
    expect(status.bench).toBe("skipped (dry run)");
    expect(summary.gpuTests).toMatch(/ 0 fail in \d+ files: .*test\/backend\/cuda-graph\.test\.ts/);
    expect(summary.ok).toBe(true);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}, 300_000);

// GPU tests run only with SPECINFER_GPU=1 on a machine with a GPU; elsewhere each one is
// reported as skipped with the reason in its name. scripts/device-check.sh finds the
// GPU test files by their import of this module.

import { test } from "bun:test";

export const GPU = process.env.SPECINFER_GPU === "1";
export const NEEDS = " (needs SPECINFER_GPU=1 and a GPU)";

/** A test that runs only on a GPU; its name says so where it is skipped. */
export function gpuTest(name: string, fn: () => void | Promise<void>, timeoutMs = 120_000): void {
  test.skipIf(!GPU)(name + NEEDS, fn, timeoutMs);
}

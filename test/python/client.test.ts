// Runs the Python client's unittest suite (clients/python/tests) with the machine's
// python3: it starts real `specinfer serve` processes on the embedded pair and compares
// with the TypeScript CLI. A missing python3 or any failing Python test fails this test.

import { expect, test } from "bun:test";
import { join } from "node:path";

const CLIENT_DIR = join(import.meta.dir, "..", "..", "clients", "python");
const LIMIT_MS = 200_000;

test("the Python client (clients/python) passes its unittest suite against specinfer serve", async () => {
  const python = Bun.which("python3");
  if (!python) throw new Error("python3 is not on PATH: the Python client's tests need it");
  const run = Bun.spawn([python, "-m", "unittest", "discover", "-s", "tests", "-t", ".", "-v"], {
    cwd: CLIENT_DIR,
    env: { ...process.env, PYTHONDONTWRITEBYTECODE: "1" },
    stdout: "pipe",
    stderr: "pipe",
    timeout: LIMIT_MS, // killed (and failed) rather than left hanging
  });
  const [out, err, code] = await Promise.all([new Response(run.stdout).text(), new Response(run.stderr).text(), run.exited]);
  console.log(out + err);
  expect(code).toBe(0);
}, LIMIT_MS + 10_000);

// Loading through the CPU backend's real mmap (the production MappedFile), compared
// with the plain file read the other format tests use.

import { expect, test } from "bun:test";
import { join } from "node:path";
import { CpuBackend } from "../../src/backend/cpu.ts";
import { loadModelFiles } from "../../src/model/load.ts";
import { readMapped } from "../helpers/mapped.ts";

const draft = join(import.meta.dir, "..", "..", "models", "llama-shakespeare-1.4m-draft");

test("vendored model through the CPU backend's mapFile matches a plain read", () => {
  const backend = CpuBackend.create({ threads: 1 });
  try {
    for (const path of [draft, join(draft, "model.gguf")]) {
      const mapped = loadModelFiles(path, (p) => backend.mapFile(p));
      const read = loadModelFiles(path, readMapped);
      try {
        expect(mapped.config).toEqual(read.config);
        for (const [name, ref] of mapped.tensors) {
          const other = read.tensors.get(name)!;
          expect(ref.offset).toBe(other.offset);
          const a = ref.file.bytes.subarray(ref.offset, ref.offset + ref.bytes);
          const b = other.file.bytes.subarray(other.offset, other.offset + other.bytes);
          expect(Buffer.compare(a, b)).toBe(0);
        }
      } finally {
        mapped.close();
        read.close();
      }
    }
  } finally {
    backend.close();
  }
});

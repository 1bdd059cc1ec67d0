// A MappedFile without native code: the file read into memory. Tests of the format
// parsers use it; production mappings come from the backend (mmap).
import { readFileSync } from "node:fs";
import type { MappedFile } from "../../src/backend/backend.ts";

export function readMapped(path: string): MappedFile {
  const bytes = new Uint8Array(readFileSync(path));
  return { path, size: bytes.byteLength, bytes, ptr: 0, close() {} };
}

/** A MappedFile over given bytes, for parsers fed hand-made or damaged data. */
export function bytesMapped(path: string, bytes: Uint8Array): MappedFile {
  return { path, size: bytes.byteLength, bytes, ptr: 0, close() {} };
}

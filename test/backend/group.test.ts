// Device groups: the host all-reduce against a float64 sum, weight shards against
// slices cut independently from the file's values, refusals, and NCCL (loaded at run
// time: its absence is a clear error; on a GPU machine, an all-reduce through it).
//
//   SPECINFER_GPU=1 node_modules/.bin/bun test test/backend/group.test.ts   (GPU parts)

import { afterAll, describe, expect, test } from "bun:test";
import { dlopen } from "bun:ffi";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Backend, DType, dtypeBytes } from "../../src/backend/backend.ts";
import { HostAllReduce, NcclAllReduce } from "../../src/backend/comm.ts";
import { CpuBackend } from "../../src/backend/cpu.ts";
import { CudaBackend, cudaLibraryPath } from "../../src/backend/cuda.ts";
import { DeviceGroup, type Shard } from "../../src/backend/group.ts";
import { dequantize, encodeTensor } from "../../src/model/encoding.ts";
import { randF32 } from "../helpers/random.ts";
import { GPU, NEEDS } from "../helpers/gpu.ts";


const dir = mkdtempSync(join(tmpdir(), "specinfer-group-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function cpuRanks(n: number): CpuBackend[] {
  return Array.from({ length: n }, () => CpuBackend.create({ threads: 1 }));
}

function put(b: Backend, values: Float32Array): number {
  const buf = b.alloc(values.byteLength);
  b.upload(buf.ptr, values);
  return buf.ptr;
}

function read(b: Backend, p: number, count: number): Float32Array {
  const out = new Float32Array(count);
  b.download(out, p);
  return out;
}

describe("host all-reduce", () => {
  for (const n of [2, 3, 4]) {
    test(`${n} CPU ranks: every rank holds the float64 sum to f32 rounding, bit-identical across ranks`, () => {
      const ranks = cpuRanks(n);
      const count = 1037;
      const inputs = ranks.map(() => randF32(count));
      const ptrs = ranks.map((b, r) => put(b, inputs[r]!));
      const comm = new HostAllReduce(ranks);
      comm.allReduceSum(ptrs, count);
      const outs = ranks.map((b, r) => read(b, ptrs[r]!, count));
      let worst = 0;
      for (let i = 0; i < count; i++) {
        const want = inputs.reduce((s, x) => s + x[i]!, 0);
        worst = Math.max(worst, Math.abs(outs[0]![i]! - want));
      }
      expect(worst).toBeLessThan(1e-5 * n);
      for (let r = 1; r < n; r++) expect(Buffer.from(outs[r]!.buffer).equals(Buffer.from(outs[0]!.buffer))).toBe(true);
      comm.close();
      for (const b of ranks) b.close();
    });
  }

  test("a wrong number of buffers, a bad count and a non-CPU rank are refused by name", () => {
    const ranks = cpuRanks(2);
    const comm = new HostAllReduce(ranks);
    const p = put(ranks[0]!, new Float32Array(4));
    expect(() => comm.allReduceSum([p], 4)).toThrow("1 buffers given for 2 ranks");
    expect(() => comm.allReduceSum([p, p], -1)).toThrow("count=-1");
    expect(() => comm.allReduceSum([p, p], 1.5)).toThrow("count=1.5");
    const fake = { ...ranks[1]!, name: "cuda" } as unknown as Backend;
    expect(() => new HostAllReduce([ranks[0]!, fake])).toThrow("rank 1 is a cuda backend");
    comm.close();
    for (const b of ranks) b.close();
  });

  test("group buffers: one handle, a buffer per rank, summed in place and freed once", () => {
    const group = new DeviceGroup(cpuRanks(3), 3);
    const buf = group.alloc(64 * 4);
    expect(buf.ptrs.length).toBe(3);
    buf.ptrs.forEach((p, r) => group.devices[r]!.upload(p, new Float32Array(64).fill(r + 1)));
    group.allReduceSum(buf, 64);
    for (let r = 0; r < 3; r++) expect(Array.from(read(group.devices[r]!, buf.ptrs[r]!, 64))).toEqual(new Array(64).fill(6));
    expect(() => group.allReduceSum(buf, 65)).toThrow("65 floats do not fit a 256-byte buffer");
    group.free(buf);
    expect(() => group.free(buf)).toThrow("not a live buffer of this group");
    group.close();
  });

  test("a group refuses more tensor-parallel ranks than devices, and zero", () => {
    const ranks = cpuRanks(2);
    expect(() => new DeviceGroup(ranks, 3)).toThrow("tensorParallel=3 needs that many devices; the group has 2");
    expect(() => new DeviceGroup(ranks, 0)).toThrow("tensorParallel must be a positive integer, got 0");
    for (const b of ranks) b.close();
  });
});

describe("weight shards", () => {
  const ROWS = 12;
  const COLS = 128;
  // The file: 40 bytes of header, then the tensor (offsets need not be aligned).
  function tensorFile(dtype: "F32" | "F16" | "Q8_0", values: Float32Array): { path: string; offset: number; bytes: number } {
    const data = encodeTensor(dtype, values);
    const path = join(dir, `${dtype}-${values.length}.bin`);
    const file = new Uint8Array(40 + data.byteLength + 8);
    file.set(data, 40);
    writeFileSync(path, file);
    return { path, offset: 40, bytes: data.byteLength };
  }
  const DTYPES = { F32: DType.F32, F16: DType.F16, Q8_0: DType.Q8_0 } as const;

  for (const name of ["F32", "F16", "Q8_0"] as const) {
    for (const size of [2, 4]) {
      test(`${name} over ${size}: column shards alias the mapping, row shards hold exactly their columns`, () => {
        const dtype = DTYPES[name];
        const values = randF32(ROWS * COLS);
        const f = tensorFile(name, values);
        // What the file holds, as floats, [ROWS, COLS].
        const stored = dequantize(dtype, encodeTensor(name, values), ROWS * COLS);
        const group = new DeviceGroup(cpuRanks(size), size);
        const file = group.devices[0]!.mapFile(f.path);
        for (let rank = 0; rank < size; rank++) {
          const device = group.devices[rank]!;
          const base: Omit<Shard, "split"> = { rank, size, rows: ROWS, cols: COLS, dtype };
          const rows = ROWS / size;
          const col = group.weights(file, f.offset, f.bytes, { ...base, split: "column" });
          expect(col).toBe(file.ptr + f.offset + rank * rows * (f.bytes / ROWS));
          const cols = COLS / size;
          const row = group.weights(file, f.offset, f.bytes, { ...base, split: "row" });
          const got = new Uint8Array(dtypeBytes(dtype, ROWS * cols));
          device.download(got, row);
          const gotValues = dequantize(dtype, got, ROWS * cols);
          for (let r = 0; r < ROWS; r++) {
            for (let c = 0; c < cols; c++) expect(gotValues[r * cols + c]).toBe(stored[r * COLS + rank * cols + c]!);
          }
          // The same shard asked again is the same copy, until its rank releases it.
          expect(group.weights(file, f.offset, f.bytes, { ...base, split: "row" })).toBe(row);
          group.releaseWeights([file], rank);
          expect(() => device.free({ ptr: row, bytes: 0, host: null })).toThrow("is not a live buffer");
        }
        file.close();
        group.close();
      });
    }
  }

  test("shards that do not divide, or cut a quantization block, are refused with the numbers", () => {
    const f = tensorFile("Q8_0", randF32(ROWS * 96));
    const group = new DeviceGroup(cpuRanks(2), 2);
    const file = group.devices[0]!.mapFile(f.path);
    const shard: Shard = { split: "row", rank: 0, size: 2, rows: ROWS, cols: 96, dtype: DType.Q8_0 };
    expect(() => group.weights(file, f.offset, f.bytes, shard)).toThrow("Q8_0 with 96 input columns: 48 per device is not a whole number of 32-element blocks");
    expect(() => group.weights(file, f.offset, f.bytes, { ...shard, split: "column", size: 5, rank: 1 })).toThrow("its 12 output rows do not divide by 5 devices");
    expect(() => group.weights(file, f.offset, f.bytes - 34, { ...shard, split: "column" })).toThrow("is not a Q8_0 [12, 96] tensor");
    file.close();
    group.close();
  });
});

describe("NCCL", () => {
  const cudaLib = existsSync(cudaLibraryPath());
  const ncclPresent = (() => {
    try {
      dlopen("libnccl.so.2", {}).close();
      return true;
    } catch {
      return false;
    }
  })();

  test.skipIf(!cudaLib || ncclPresent)(
    `without libnccl.so.2 the NCCL communicator fails with an error naming it${!cudaLib ? " (needs libspecinfer_cuda.so: nvcc)" : ncclPresent ? " (needs a machine without NCCL)" : ""}`,
    () => {
      expect(() => new NcclAllReduce([{ nativeContext: 0, device: 0 }])).toThrow("cannot load libnccl.so.2");
    },
  );

  // A GPU machine without NCCL is covered by the test above.
  test.skipIf(!GPU || !ncclPresent)(`one GPU through NCCL: a CUDA group's all-reduce over its one rank keeps the values${!GPU ? NEEDS : !ncclPresent ? " (needs libnccl.so.2)" : ""}`, () => {
    const gpu = CudaBackend.create();
    const group = new DeviceGroup([gpu], 1, new NcclAllReduce([{ nativeContext: gpu.nativeContext, device: 0 }]));
    const values = randF32(4099);
    const buf = group.alloc(values.byteLength);
    group.devices[0]!.upload(buf.ptrs[0]!, values);
    group.allReduceSum(buf, values.length);
    expect(Array.from(read(group.devices[0]!, buf.ptrs[0]!, values.length))).toEqual(Array.from(values));
    expect(() => group.comm.allReduceSum([buf.ptrs[0]!, buf.ptrs[0]!], 4)).toThrow("2 buffers given for 1 ranks");
    group.free(buf);
    group.close();
  });
});

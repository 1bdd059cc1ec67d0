// CUDA contexts on chosen GPUs and tensor parallelism over them. Here (no GPU) the
// checks that need none run: device-index validation, the GPU-shortage message, and the
// errors a machine without GPUs gives. Under SPECINFER_GPU=1: every GPU runs ops of its
// own context while other contexts change the thread's current device, an index past the
// last GPU is refused naming the count, a model split over 2 GPUs (NCCL) gives the
// single-GPU model's logits, and one rank through NCCL gives the unsplit model's.
//
//   SPECINFER_GPU=1 node_modules/.bin/bun test test/backend/multi-gpu.test.ts

import { afterAll, describe, expect, test } from "bun:test";
import { dlopen } from "bun:ffi";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SI_DEVICE_MASK, SI_DEVICE_SHIFT, SYMBOLS } from "../../src/backend/abi.ts";
import { DType } from "../../src/backend/backend.ts";
import { NcclAllReduce } from "../../src/backend/comm.ts";
import { cpuLibraryPath } from "../../src/backend/cpu.ts";
import { CudaBackend, cudaDevices, cudaLibraryPath } from "../../src/backend/cuda.ts";
import { DeviceGroup, gpuShortage } from "../../src/backend/group.ts";
import { LLAMA_SPLITS, LlamaModel } from "../../src/model/llama.ts";
import { loadModelFiles } from "../../src/model/load.ts";
import { ParallelModel } from "../../src/model/parallel.ts";
import { loadModel } from "../../src/model/registry.ts";
import { chainLogits, maxRelError } from "../helpers/forward.ts";
import { randF32 } from "../helpers/random.ts";
import { writeTinyModel } from "../helpers/tiny-model.ts";
import { GPU, NEEDS } from "../helpers/gpu.ts";

const cudaLib = existsSync(cudaLibraryPath());
const GPUS = GPU ? cudaDevices().count : 0;
const ncclPresent = (() => {
  try {
    dlopen("libnccl.so.2", {}).close();
    return true;
  } catch {
    return false;
  }
})();

const dir = mkdtempSync(join(tmpdir(), "specinfer-multi-gpu-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const PROMPT = [1, 17, 42, 5, 88, 63, 12, 9, 30, 71, 2, 55];

describe("device choice, without a GPU", () => {
  test("a device index that is not an integer in 0..65535 is refused by value before anything loads", () => {
    for (const device of [-1, 1.5, 65536, Number.NaN]) {
      expect(() => CudaBackend.create({ device })).toThrow(`device must be an integer in 0..65535, got ${device}`);
    }
  });

  test("the GPU-shortage message names the devices needed and the GPUs found", () => {
    expect(gpuShortage(2, 2, { count: 1, problem: null })).toBe("tensorParallel=2 needs 2 CUDA GPUs, one per device, but this machine has 1");
    expect(gpuShortage(3, 2, { count: 2, problem: null })).toBe(
      "a group of 3 devices (tensorParallel=2, the SSMs on a device of their own) needs 3 CUDA GPUs, one per device, but this machine has 2",
    );
    expect(gpuShortage(4, 4, { count: 0, problem: "cudaGetDeviceCount failed with CUDA error 35" })).toBe(
      "tensorParallel=4 needs 4 CUDA GPUs, one per device, but this machine has 0 (cudaGetDeviceCount failed with CUDA error 35)",
    );
    expect(gpuShortage(2, 2, { count: 2, problem: null })).toBeNull();
    expect(gpuShortage(1, 1, { count: 8, problem: null })).toBeNull();
  });

  test("the device bits of si_create's flags are the header's (SI_DEVICE_SHIFT, SI_DEVICE_MASK)", () => {
    const header = readFileSync(join(import.meta.dir, "../../ffi/specinfer.h"), "utf8");
    expect(Number(header.match(/SI_DEVICE_SHIFT = (\w+)/)?.[1])).toBe(SI_DEVICE_SHIFT);
    expect(Number(header.match(/SI_DEVICE_MASK = (\w+)/)?.[1])).toBe(SI_DEVICE_MASK);
  });

  test("the CPU library ignores the device bits of si_create's flags (its ABI is unchanged)", () => {
    const { symbols } = dlopen(cpuLibraryPath(), { si_create: SYMBOLS.si_create, si_threads: SYMBOLS.si_threads, si_destroy: SYMBOLS.si_destroy });
    const ctx = symbols.si_create(2, 7 << SI_DEVICE_SHIFT);
    expect(ctx).not.toBeNull();
    expect(symbols.si_threads(ctx)).toBe(2);
    symbols.si_destroy(ctx);
  });

  const noGpuHere = !cudaLib || GPU;
  const why = !cudaLib ? " (needs libspecinfer_cuda.so: nvcc)" : GPU ? " (needs a machine without a GPU)" : "";

  test.skipIf(noGpuHere)(`without a GPU the CUDA library counts none and opening GPU 3 says why${why}`, () => {
    const found = cudaDevices();
    expect(found.count).toBe(0);
    expect(() => CudaBackend.create({ device: 3 })).toThrow("no usable CUDA GPU 3: ");
  });

  test.skipIf(noGpuHere)(`without a GPU a CUDA group of 2 is refused naming 2 GPUs needed and 0 found${why}`, async () => {
    await expect(DeviceGroup.create({ kind: "cuda", tensorParallel: 2 })).rejects.toThrow("tensorParallel=2 needs 2 CUDA GPUs, one per device, but this machine has 0");
    await expect(DeviceGroup.create({ kind: "cuda", tensorParallel: 1, devices: 2 })).rejects.toThrow(
      "a group of 2 devices (tensorParallel=1, the SSMs on a device of their own) needs 2 CUDA GPUs, one per device, but this machine has 0",
    );
  });
});

describe("CUDA contexts on their own GPUs", () => {
  test.skipIf(!GPU)(`each GPU's context adds vectors correctly after every other context was made current${NEEDS}`, () => {
    const gpus = Array.from({ length: GPUS }, (_, d) => CudaBackend.create({ device: d }));
    // The last create left the last GPU current: every op must switch to its own.
    for (const g of gpus) {
      const x = randF32(4099);
      const y = randF32(4099);
      const bx = g.alloc(x.byteLength);
      const by = g.alloc(y.byteLength);
      g.upload(bx.ptr, x);
      g.upload(by.ptr, y);
      g.add(bx.ptr, by.ptr, x.length);
      const got = new Float32Array(x.length);
      g.download(got, bx.ptr);
      expect(Array.from(got)).toEqual(Array.from(x, (v, i) => Math.fround(v + y[i]!)));
      expect(g.device).toBe(gpus.indexOf(g));
    }
    for (const g of gpus) g.close();
  });

  test.skipIf(!GPU)(`a device index past the last GPU is refused naming the GPU count${NEEDS}`, async () => {
    const s = GPUS === 1 ? "" : "s";
    expect(() => CudaBackend.create({ device: GPUS })).toThrow(`CUDA device ${GPUS} was asked for, but this machine has ${GPUS} CUDA device${s}`);
    await expect(DeviceGroup.create({ kind: "cuda", tensorParallel: GPUS + 1 })).rejects.toThrow(
      `tensorParallel=${GPUS + 1} needs ${GPUS + 1} CUDA GPUs, one per device, but this machine has ${GPUS}`,
    );
  });
});

/** Dims whose heads, KV heads and neurons split over `tp` ranks, with O's and down's
 *  input slices whole Q8_0 blocks (64 columns per rank). */
function splitDims(tp: number) {
  return { vocab: 96, hidden: 128, intermediate: 64 * tp, layers: 2, heads: 2 * tp, kvHeads: tp, headDim: 32 };
}

describe("tensor parallelism over GPUs (NCCL)", () => {
  // 2 GPUs, and every GPU of the machine when it has more.
  for (const tp of [...new Set([2, Math.max(2, GPUS)])]) {
    for (const [dtype, format] of [["F32", "safetensors"], ["Q8_0", "gguf"]] as const) {
      const skip = !GPU || GPUS < tp || !ncclPresent;
      const why = !GPU ? NEEDS : GPUS < tp ? ` (needs ${tp} GPUs)` : !ncclPresent ? " (needs libnccl.so.2)" : "";
      test.skipIf(skip)(`${dtype} ${format}, tensorParallel ${tp} on ${tp} GPUs: chain logits equal the single-GPU model's within rounding${why}`, async () => {
        const path = writeTinyModel(join(dir, `tp${tp}-${dtype}`), { seed: 11, dims: splitDims(tp), dtype, format }).path;
        const single = CudaBackend.create();
        const alone = loadModel(path, single, { maxBatchTokens: 64 });
        const want = chainLogits(alone, PROMPT, DType.F32);
        alone.close();
        single.close();
        const group = await DeviceGroup.create({ kind: "cuda", tensorParallel: tp });
        expect(group.devices.map((d) => (d as CudaBackend).device)).toEqual(Array.from({ length: tp }, (_, d) => d));
        const split = loadModel(path, group, { maxBatchTokens: 64 });
        const got = chainLogits(split, PROMPT, DType.F32);
        split.close();
        group.close();
        // A wrong shard or a missing sum is off by O(1); only the sums' order differs here.
        expect(maxRelError(got, want)).toBeLessThan(1e-4);
      });
    }
  }

  const why = !GPU ? NEEDS : !ncclPresent ? " (needs libnccl.so.2)" : "";
  test.skipIf(!GPU || !ncclPresent)(`one rank whose two sums per layer go through NCCL gives the unsplit model's logits${why}`, () => {
    const path = writeTinyModel(join(dir, "tp1"), { seed: 12, dims: splitDims(2), dtype: "F32", format: "safetensors" }).path;
    const gpu = CudaBackend.create();
    const group = new DeviceGroup([gpu], 1, new NcclAllReduce([gpu]));
    const alone = loadModel(path, gpu, { maxBatchTokens: 64 });
    const want = chainLogits(alone, PROMPT, DType.F32);
    alone.close();
    const files = loadModelFiles(path, (p) => gpu.mapFile(p));
    const rank = new LlamaModel(gpu, files, { maxBatchTokens: 64 }, { group, rank: 0, splits: LLAMA_SPLITS });
    const viaNccl = new ParallelModel([rank], group, files);
    const got = chainLogits(viaNccl, PROMPT, DType.F32);
    viaNccl.close();
    group.close();
    expect(maxRelError(got, want)).toBeLessThan(1e-5);
  });
});

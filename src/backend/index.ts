// Picks a backend. CPU is always there; CUDA only where its library and a GPU are.

import type { Backend } from "./backend";
import { CpuBackend } from "./cpu";

export type BackendKind = "cpu" | "cuda";

export interface BackendOptions {
  kind?: BackendKind;
  /** CPU worker threads; default one per core. */
  threads?: number;
  /** CUDA: the GPU to open; default 0. */
  device?: number;
}

export async function createBackend(opts: BackendOptions = {}): Promise<Backend> {
  if ((opts.kind ?? "cpu") === "cuda") {
    const { CudaBackend } = await import("./cuda");
    return CudaBackend.create({ device: opts.device });
  }
  return CpuBackend.create({ threads: opts.threads });
}

export type { Backend } from "./backend";

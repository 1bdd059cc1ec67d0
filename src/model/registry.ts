// The architecture registry: for each family, how its config is read (config.json or
// GGUF metadata), which tensors it needs (HF names and shapes), how GGUF tensor names
// map to HF ones, and the builder of its forward. Nothing outside src/model/ names an
// architecture: callers use loadModel and the CausalLM it returns.

import type { Backend } from "../backend/backend";
import { DeviceGroup } from "../backend/group";
import { LLAMA_NAMES, llamaTensors, type ExpectedTensor } from "./arch";
import type { CausalLM, ForwardOptions } from "./causal-lm";
import { LLAMA_HF_ARCHITECTURES, llamaConfigFromGGUF, llamaConfigFromHF, type Arch, type Fail, type LlamaArch, type ModelConfig } from "./config";
import { ModelFormatError, shown } from "./errors";
import { LLAMA_SPLITS, LlamaModel } from "./llama";
import { loadModelFiles, type LoadedModel } from "./load";
import { checkSplittable, ParallelModel, type Placement, type SplittableLM, type TensorSplits } from "./parallel";
import { FALCON } from "./falcon";
import { MPT } from "./mpt";
import { OPT } from "./opt";
import { STARCODER } from "./starcoder";
import type { GGUFValue } from "./write";

export interface Family {
  /** HF `architectures[0]` -> arch. */
  hfArchitectures: Record<string, Arch>;
  /** HF `model_type` -> arch, read when `architectures` names none (default: the arch names). */
  modelTypes?: Record<string, Arch>;
  /** GGUF `general.architecture` values this family reads (each is also its arch);
   *  none where llama.cpp has no such architecture. */
  ggufArchs: readonly Arch[];
  configFromHF(j: Record<string, unknown>, arch: Arch, fail: Fail): ModelConfig;
  configFromGGUF?(metadata: Map<string, unknown>, tensorNames: Set<string>, arch: Arch, fail: Fail): ModelConfig;
  /** Every tensor the config needs, HF names and shapes. */
  tensors(cfg: ModelConfig): ExpectedTensor[];
  /** A tensor every layer l has: checked first, so a damaged layer count fails fast. */
  layerTensor(l: number): string;
  /** `config` is the file's (some families name a tensor by the config). */
  hfNameFromGGUF(name: string, config?: ModelConfig): string | null;
  ggufNameFromHF(name: string): string | null;
  build(backend: Backend, files: LoadedModel, opts: ForwardOptions): CausalLM;
  /** Families that split over devices: their layers' splits, and one rank's builder. */
  parallel?: { splits: TensorSplits; build(backend: Backend, files: LoadedModel, opts: ForwardOptions, placement: Placement): SplittableLM };
  /** config.json for a config (writers of test models and conversions); LLaMA's is write.ts's. */
  hfConfig?(c: ModelConfig): Record<string, unknown>;
  /** The `{arch}.*` GGUF keys for a config; LLaMA's are write.ts's. */
  ggufMetadata?(c: ModelConfig): Record<string, GGUFValue>;
  /** A tensor's values as llama.cpp's converter stores them (e.g. reordered rows). */
  ggufTensor?(hfName: string, values: Float32Array, c: ModelConfig): Float32Array;
}

const LLAMA: Family = {
  hfArchitectures: LLAMA_HF_ARCHITECTURES,
  ggufArchs: ["llama", "mistral", "qwen2"],
  configFromHF: (j, arch, fail) => llamaConfigFromHF(j, arch as LlamaArch, fail),
  configFromGGUF: (metadata, names, arch, fail) => llamaConfigFromGGUF(metadata, names, arch as LlamaArch, fail),
  tensors: llamaTensors,
  layerTensor: (l) => `model.layers.${l}.input_layernorm.weight`,
  ...LLAMA_NAMES,
  build: (backend, files, opts) => new LlamaModel(backend, files, opts),
  parallel: { splits: LLAMA_SPLITS, build: (backend, files, opts, placement) => new LlamaModel(backend, files, opts, placement) },
};

const FAMILIES: readonly Family[] = [LLAMA, STARCODER, OPT, MPT, FALCON];

/** The family serving `arch`. */
export function familyOf(arch: Arch): Family {
  const family = FAMILIES.find((f) => Object.values(f.hfArchitectures).includes(arch) || f.ggufArchs.includes(arch));
  if (!family) throw new Error(`no model family serves architecture ${arch}`);
  return family;
}

/** The HF architectures we read, short: `{Llama,Mistral,...}ForCausalLM`. */
function hfNames(): string {
  const names = [...new Set(FAMILIES.flatMap((f) => Object.keys(f.hfArchitectures)))];
  const stems = names.filter((n) => n.endsWith("ForCausalLM")).map((n) => n.slice(0, -"ForCausalLM".length));
  return [`{${stems.join(",")}}ForCausalLM`, ...names.filter((n) => !n.endsWith("ForCausalLM"))].join(", ");
}

/** Config from a config.json's text; its `architectures[0]` (or `model_type`) picks the family. */
export function configFromHF(path: string, text: string): ModelConfig {
  const fail = (detail: string): never => {
    throw new ModelFormatError(path, detail);
  };
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    return fail(`not valid JSON: ${(e as Error).message}`);
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) return fail("not a JSON object");
  const j = raw as Record<string, unknown>;
  const first: unknown = Array.isArray(j.architectures) ? j.architectures[0] : undefined;
  for (const family of FAMILIES) {
    const byName = typeof first === "string" && Object.hasOwn(family.hfArchitectures, first) ? family.hfArchitectures[first] : undefined;
    const types = family.modelTypes ?? Object.fromEntries(Object.values(family.hfArchitectures).map((a) => [a, a]));
    const arch = byName ?? (typeof j.model_type === "string" && Object.hasOwn(types, j.model_type) ? types[j.model_type] : undefined);
    if (arch) return family.configFromHF(j, arch, fail);
  }
  const named = first ?? j.model_type;
  return fail(`unsupported architecture ${typeof named === "string" ? named : shown(named)} (supported: ${hfNames()})`);
}

/** Config from GGUF metadata; `general.architecture` picks the family. */
export function configFromGGUF(path: string, metadata: Map<string, unknown>, tensorNames: Set<string>): ModelConfig {
  const fail = (detail: string): never => {
    throw new ModelFormatError(path, detail);
  };
  const arch = metadata.get("general.architecture");
  if (typeof arch !== "string") return fail("missing key general.architecture");
  const family = FAMILIES.find((f) => f.ggufArchs.includes(arch as Arch));
  if (!family) return fail(`unsupported architecture ${arch} (supported: ${FAMILIES.flatMap((f) => f.ggufArchs).join(", ")})`);
  return family.configFromGGUF!(metadata, tensorNames, arch as Arch, fail);
}

/** The tensors a config needs, HF names and shapes. */
export function expectedTensors(cfg: ModelConfig): ExpectedTensor[] {
  return familyOf(cfg.arch).tensors(cfg);
}

/** HF name of a GGUF tensor of an `arch` model, or null for tensors outside its table. */
export function hfNameFromGGUF(name: string, arch: Arch, config?: ModelConfig): string | null {
  return familyOf(arch).hfNameFromGGUF(name, config);
}

/** GGUF name of an HF tensor of an `arch` model (inverse of hfNameFromGGUF). */
export function ggufNameFromHF(name: string, arch: Arch): string | null {
  return familyOf(arch).ggufNameFromHF(name);
}

/** Maps the files at `path` (HF directory or GGUF) and builds its family's model on
 *  `device`, or split over a group's first `tensorParallel` devices. */
export function loadModel(path: string, device: Backend | DeviceGroup, opts: ForwardOptions = {}): CausalLM {
  const group = device instanceof DeviceGroup ? device : null;
  const backend = group ? group.devices[0]! : (device as Backend);
  const files = loadModelFiles(path, (p) => backend.mapFile(p));
  try {
    const family = familyOf(files.config.arch);
    if (!group || group.tensorParallel === 1) return family.build(backend, files, opts);
    return buildSplit(family, group, files, opts);
  } catch (e) {
    files.close();
    throw e;
  }
}

function buildSplit(family: Family, group: DeviceGroup, files: LoadedModel, opts: ForwardOptions): CausalLM {
  const { arch } = files.config;
  const parallel = family.parallel;
  if (!parallel) {
    const splittable = FAMILIES.filter((f) => f.parallel).flatMap((f) => [...new Set(Object.values(f.hfArchitectures))]);
    throw new Error(`tensor parallelism: ${arch} models cannot be split over devices yet (supported: ${splittable.join(", ")}); load it with tensorParallel 1`);
  }
  checkSplittable(files.config, group.tensorParallel);
  const ranks: SplittableLM[] = [];
  try {
    for (let rank = 0; rank < group.tensorParallel; rank++) {
      ranks.push(parallel.build(group.devices[rank]!, files, opts, { group, rank, splits: parallel.splits }));
    }
  } catch (e) {
    for (const r of ranks) r.close();
    throw e;
  }
  return new ParallelModel(ranks, group, files);
}

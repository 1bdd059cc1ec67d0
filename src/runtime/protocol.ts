// The messages between an EngineClient and its engine host (over a Worker's
// postMessage, or in-thread): plain, structured-cloneable data only.

import type { CompileSetup, EngineInfo, RuntimeOptions } from "./load";
import type { GenerationConfig } from "../engine/config";
import type { EngineEvent, EngineStats } from "../engine/core";
import type { StatsSummary } from "../engine/stats";

export type ToEngine =
  | { type: "load"; options: RuntimeOptions }
  | { type: "submit"; id: number; prompt: number[]; config: Partial<GenerationConfig> }
  | { type: "cancel"; id: number }
  | { type: "stats"; call: number }
  | { type: "compile"; call: number; setup: CompileSetup }
  | { type: "inject-fault"; message: string }
  /** Test hook (Worker only): the worker exits at once with `code`. */
  | { type: "exit"; code: number }
  | { type: "close"; call: number };

export type FromEngine =
  | { type: "progress"; fraction: number; what: string }
  | { type: "loaded"; info: EngineInfo; defaults: Partial<GenerationConfig> }
  | { type: "load-failed"; message: string }
  | { type: "events"; events: EngineEvent[] }
  /** A submit the engine refused (RequestError / ConfigError), with the field at fault. */
  | { type: "rejected"; id: number; message: string; param?: string }
  | { type: "reply"; call: number; value?: EngineStats | EngineInfo | { summary: StatsSummary }; error?: string };

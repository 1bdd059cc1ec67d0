// The engine host: owns the runtime (backend, models, caches, engine) and runs the step
// loop, taking messages between steps. In a Worker (worker.ts) it keeps every native
// call off the caller's thread; in-thread (tests) it runs the same code.

import { Runtime } from "./load";
import { ConfigError } from "../engine/config";
import { RequestError, type EngineEvent } from "../engine/core";
import type { FromEngine, ToEngine } from "./protocol";

export class EngineHost {
  private runtime: Runtime | null = null;
  private looping = false;

  constructor(private readonly post: (msg: FromEngine) => void) {}

  async handle(msg: ToEngine): Promise<void> {
    if (msg.type === "load") return this.load(msg.options);
    const rt = this.runtime;
    if (!rt) {
      if ("call" in msg) this.post({ type: "reply", call: msg.call, error: "the engine is not loaded" });
      return;
    }
    switch (msg.type) {
      case "submit":
        try {
          rt.engine.submit(msg.prompt, rt.generationConfig(msg.config), msg.id);
        } catch (e) {
          const err = e as Error;
          const param = err instanceof RequestError ? err.param : err instanceof ConfigError ? configField(err.message) : undefined;
          this.post({ type: "rejected", id: msg.id, message: err.message, ...(param ? { param } : {}) });
          return;
        }
        this.loop();
        return;
      case "cancel":
        this.postEvents(rt.engine.cancel(msg.id));
        return;
      case "stats":
        this.post({ type: "reply", call: msg.call, value: rt.engine.stats() });
        return;
      case "compile":
        try {
          rt.compile(msg.setup);
          this.post({ type: "reply", call: msg.call, value: rt.info });
        } catch (e) {
          this.post({ type: "reply", call: msg.call, error: (e as Error).message });
        }
        return;
      case "inject-fault":
        rt.engine.injectFault(msg.message);
        return;
      case "exit":
        return; // handled by the Worker entry; in-thread there is nothing to end
      case "close":
        this.postEvents(rt.engine.close());
        rt.close();
        this.runtime = null;
        this.post({ type: "reply", call: msg.call });
        return;
    }
  }

  private async load(options: ToEngine & { type: "load" } extends { options: infer O } ? O : never): Promise<void> {
    try {
      this.runtime = await Runtime.load(options, (fraction, what) => this.post({ type: "progress", fraction, what }));
      this.post({ type: "loaded", info: this.runtime.info, defaults: this.runtime.defaults });
    } catch (e) {
      this.post({ type: "load-failed", message: (e as Error).message });
    }
  }

  private postEvents(events: EngineEvent[]): void {
    if (events.length > 0) this.post({ type: "events", events });
  }

  /** Steps while there is work, yielding to the event loop between steps so that
   *  submits and cancels arrive and events leave as each step ends. */
  private async loop(): Promise<void> {
    if (this.looping) return;
    this.looping = true;
    try {
      while (this.runtime && !this.runtime.engine.idle) {
        try {
          this.postEvents(this.runtime.engine.step());
        } catch (e) {
          // A fault outside any one step's requests (scheduling): fail what is queued.
          this.postEvents(this.runtime.engine.failAll((e as Error).message));
        }
        await new Promise((r) => setImmediate(r));
      }
      if (this.runtime) this.postEvents(this.runtime.engine.drainFinished());
    } finally {
      this.looping = false;
    }
  }
}

/** The field a ConfigError names ("temperature must be ..."). */
function configField(message: string): string | undefined {
  return /^(\w+) must be/.exec(message)?.[1];
}

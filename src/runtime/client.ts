// EngineClient: the caller's side of the engine. One class over two transports: a Bun
// Worker (the engine's native calls never block the caller's thread) or in-thread
// (tests, tools). Submit, cancel, stats and compile go one way; token and finish events
// come back.

import type { EngineInfo, Progress, RuntimeOptions, CompileSetup } from "./load";
import type { GenerationConfig } from "../engine/config";
import { RequestError, type EngineEvent, type EngineStats } from "../engine/core";
import { EngineHost } from "./host";
import type { FromEngine, ToEngine } from "./protocol";

/** The engine is gone (closed, or its Worker exited): calls cannot complete.
 *  @example
 *  try { await llm.generate("x"); } catch (e) { if (e instanceof EngineClosedError) reconnect(); }
 */
export class EngineClosedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "EngineClosedError";
  }
}

export interface RequestHandlers {
  onEvent(event: EngineEvent): void;
  /** The engine refused the request or ended before finishing it. */
  onError(error: Error): void;
}

interface Transport {
  send(msg: ToEngine): void;
  terminate(): void;
}

export class EngineClient {
  info!: EngineInfo;
  defaults: Partial<GenerationConfig> = {};
  private nextId = 1;
  private nextCall = 1;
  private readonly requests = new Map<number, RequestHandlers>();
  private readonly calls = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closed: Error | null = null;
  private transport!: Transport;
  private loading: { resolve: () => void; reject: (e: Error) => void; progress?: Progress } | null = null;

  private constructor() {}

  /** Loads a runtime in a new Worker (`worker: true`) or on this thread. */
  static async start(options: RuntimeOptions, opts: { worker?: boolean; onProgress?: Progress } = {}): Promise<EngineClient> {
    const client = new EngineClient();
    const loaded = new Promise<void>((resolve, reject) => (client.loading = { resolve, reject, progress: opts.onProgress }));
    client.transport = opts.worker === false ? client.inThread() : client.worker();
    client.transport.send({ type: "load", options });
    await loaded;
    return client;
  }

  private worker(): Transport {
    const w = new Worker(new URL("./worker.ts", import.meta.url));
    w.onmessage = (e: MessageEvent<FromEngine>) => this.receive(e.data);
    w.addEventListener("error", (e) => this.fail(new EngineClosedError(`the engine worker failed: ${(e as ErrorEvent).message ?? "unknown error"}`)));
    w.addEventListener("close", (e) => this.fail(new EngineClosedError(`the engine worker exited (code ${(e as CloseEvent).code})`)));
    return { send: (msg) => w.postMessage(msg), terminate: () => w.terminate() };
  }

  private inThread(): Transport {
    // Messages cross as they would through a Worker: asynchronously, never re-entering.
    const host = new EngineHost((msg) => queueMicrotask(() => this.receive(msg)));
    return { send: (msg) => queueMicrotask(() => void host.handle(msg)), terminate: () => {} };
  }

  private receive(msg: FromEngine): void {
    switch (msg.type) {
      case "progress":
        this.loading?.progress?.(msg.fraction, msg.what);
        return;
      case "loaded":
        this.info = msg.info;
        this.defaults = msg.defaults;
        this.loading?.resolve();
        this.loading = null;
        return;
      case "load-failed":
        this.loading?.reject(new Error(msg.message));
        this.loading = null;
        this.transport.terminate();
        return;
      case "events":
        for (const e of msg.events) {
          const handlers = this.requests.get(e.id);
          if (!handlers) continue;
          if (e.type === "finish") this.requests.delete(e.id);
          handlers.onEvent(e);
        }
        return;
      case "rejected": {
        const handlers = this.requests.get(msg.id);
        this.requests.delete(msg.id);
        handlers?.onError(new RequestError(msg.message, msg.param));
        return;
      }
      case "reply": {
        const call = this.calls.get(msg.call);
        this.calls.delete(msg.call);
        if (msg.error) call?.reject(new Error(msg.error));
        else call?.resolve(msg.value);
        return;
      }
    }
  }

  /** Queues a generation; events arrive through `handlers`. Returns its id. */
  submit(prompt: number[], config: Partial<GenerationConfig>, handlers: RequestHandlers): number {
    const id = this.nextId++;
    if (this.closed) {
      queueMicrotask(() => handlers.onError(this.closed!));
      return id;
    }
    this.requests.set(id, handlers);
    this.transport.send({ type: "submit", id, prompt, config });
    return id;
  }

  cancel(id: number): void {
    if (!this.closed && this.requests.has(id)) this.transport.send({ type: "cancel", id });
  }

  stats(): Promise<EngineStats> {
    return this.call({ type: "stats" }) as Promise<EngineStats>;
  }

  async compile(setup: CompileSetup): Promise<EngineInfo> {
    this.info = (await this.call({ type: "compile", setup })) as EngineInfo;
    return this.info;
  }

  /** Test hook: the engine's next step throws with `message`. */
  injectFault(message: string): void {
    this.transport.send({ type: "inject-fault", message });
  }

  /** Test hook: the engine's Worker exits at once, as a crash would end it. */
  killWorkerForTest(code: number): void {
    this.transport.send({ type: "exit", code });
  }

  /** Ends the engine: requests in flight and later calls reject with EngineClosedError. */
  async close(): Promise<void> {
    if (this.closed) return;
    const error = new EngineClosedError("the engine was closed while this request ran");
    for (const [, handlers] of this.requests) handlers.onError(error);
    this.requests.clear();
    await this.call({ type: "close" });
    this.fail(new EngineClosedError("the engine is closed"));
    this.transport.terminate();
  }

  private call(msg: { type: "stats" } | { type: "compile"; setup: CompileSetup } | { type: "close" }): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed);
    const call = this.nextCall++;
    return new Promise((resolve, reject) => {
      this.calls.set(call, { resolve, reject });
      this.transport.send({ ...msg, call } as ToEngine);
    });
  }

  /** Rejects everything pending: nothing waits forever on a dead engine. */
  private fail(error: Error): void {
    if (this.closed) return;
    this.closed = error;
    this.loading?.reject(error);
    this.loading = null;
    for (const [, handlers] of this.requests) handlers.onError(error);
    this.requests.clear();
    for (const [, call] of this.calls) call.reject(error);
    this.calls.clear();
  }
}

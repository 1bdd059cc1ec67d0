// Bun Worker entry: the engine host on its own thread.

import { EngineHost } from "./host";
import type { ToEngine } from "./protocol";

declare const self: Worker;

const host = new EngineHost((msg) => self.postMessage(msg));
self.onmessage = (e: MessageEvent<ToEngine>) => {
  // Test hook: the worker dies as a native crash would end it.
  if (e.data.type === "exit") process.exit(e.data.code);
  void host.handle(e.data);
};

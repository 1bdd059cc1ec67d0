// Bun Worker entry: the engine host on its own thread.

import { EngineHost } from "./host";
import type { ToEngine } from "./protocol";

declare const self: Worker;

const host = new EngineHost((msg) => self.postMessage(msg));
self.onmessage = (e: MessageEvent<ToEngine>) => {
  void host.handle(e.data);
};

// GET /health: 503 while the model loads, then 200 {"status":"ok"}. Never needs a key.

import { Hono } from "hono";
import type { Deps } from "../generation";

export function healthRoute(deps: Deps): Hono {
  return new Hono().get("/health", (c) => {
    deps.engine(); // throws the 503 while loading
    return c.json({ status: "ok" });
  });
}

// GET /metrics: Prometheus text (engine figures once the model is loaded).

import { Hono } from "hono";
import type { Deps } from "../generation";

export function metricsRoute(deps: Deps): Hono {
  return new Hono().get("/metrics", async (c) => {
    const text = await deps.metrics.render(deps.loadedEngine());
    return c.body(text, 200, { "Content-Type": deps.metrics.contentType });
  });
}

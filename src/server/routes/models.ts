// GET /v1/models: the one model this server serves.

import { Hono } from "hono";
import { ApiError } from "../errors";
import type { Deps } from "../generation";

export function modelsRoute(deps: Deps): Hono {
  const created = Math.floor(Date.now() / 1000);
  const card = { id: deps.servedModelName, object: "model", created, owned_by: "specinfer" };
  return new Hono()
    .get("/models", (c) => c.json({ object: "list", data: [card] }))
    .get("/models/:id{.+}", (c) => {
      if (c.req.param("id") !== deps.servedModelName) throw new ApiError(404, `The model "${c.req.param("id")}" does not exist`, "model", "model_not_found");
      return c.json(card);
    });
}

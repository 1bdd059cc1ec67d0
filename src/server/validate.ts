// Body validation with zod through @hono/zod-validator; a failure becomes our 400.

import { zValidator } from "@hono/zod-validator";
import type { MiddlewareHandler } from "hono";
import type { ZodType } from "zod";
import { badRequest, fromZod } from "./errors";

/** Hono's JSON validator skips bodies not labelled JSON; say so instead of reporting
 *  every field missing. */
export const requireJson: MiddlewareHandler = async (c, next) => {
  if (!/^application\/([\w.-]+\+)?json\b/i.test(c.req.header("Content-Type") ?? "")) {
    throw badRequest("the request body must be JSON, sent with Content-Type: application/json");
  }
  await next();
};

export const validated = <T extends ZodType>(schema: T) =>
  zValidator("json", schema, (result) => {
    if (!result.success) throw fromZod(result.error);
  });

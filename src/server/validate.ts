// Body validation with zod through @hono/zod-validator; a failure becomes our 400.

import { isUtf8 } from "node:buffer";
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
  // JSON text is UTF-8 (RFC 8259); decoding bad bytes as U+FFFD would change the prompt.
  if (!isUtf8(await c.req.arrayBuffer())) throw badRequest("the request body is not valid UTF-8");
  await next();
};

export const validated = <T extends ZodType>(schema: T) =>
  zValidator("json", schema, (result) => {
    if (!result.success) throw fromZod(result.error);
  });

// POST /v1/completions: a prompt (text, texts, token ids or lists of them) continued.

import { Hono } from "hono";
import { requireJson, validated } from "../validate";
import { respond, type Deps } from "../generation";
import { checkContext, checkModel, choiceOptions, CompletionBody, completionPrompts, generationSettings } from "../params";
import { completionShape } from "../responses";

export function completionsRoute(deps: Deps): Hono {
  return new Hono().post("/completions", requireJson, validated(CompletionBody), (c) => {
    const body = c.req.valid("json");
    checkModel(body.model, deps.servedModelName);
    const llm = deps.engine();
    const prompts = completionPrompts(body.prompt, llm.tokenizer);
    const settings = generationSettings(body, body.logprobs ?? undefined, llm.info.vocabSize);
    checkContext(prompts, settings.maxNewTokens, llm.info, { prompt: "prompt", maxTokens: "max_tokens" });
    return respond(c, deps, {
      prompts,
      settings,
      shape: completionShape,
      ...choiceOptions(body),
    });
  });
}

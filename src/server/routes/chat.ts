// POST /v1/chat/completions: the model's chat template over the messages, then the reply.

import { Hono } from "hono";
import { requireJson, validated } from "../validate";
import { respond, type Deps } from "../generation";
import { chatMessages, ChatBody, checkContext, checkModel, choiceOptions, generationSettings } from "../params";
import { chatShape } from "../responses";

export function chatRoute(deps: Deps): Hono {
  return new Hono().post("/chat/completions", requireJson, validated(ChatBody), (c) => {
    const body = c.req.valid("json");
    checkModel(body.model, deps.servedModelName);
    const llm = deps.engine();
    const prompt = llm.chatPrompt(chatMessages(body.messages));
    const logprobs = body.logprobs ? (body.top_logprobs ?? 0) : undefined;
    const settings = generationSettings(body, logprobs, llm.info.vocabSize);
    const maxTokens = body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens";
    checkContext([prompt], settings.maxNewTokens, llm.info, { prompt: "messages", maxTokens });
    return respond(c, deps, {
      prompts: [prompt],
      settings,
      shape: chatShape,
      ...choiceOptions(body),
    });
  });
}

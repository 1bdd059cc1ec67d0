// Chat prompts: the model's Jinja chat template (tokenizer_config.json `chat_template`
// or GGUF `tokenizer.chat_template`) rendered with @huggingface/jinja, or a plain
// fallback for models that have none.

import { Template } from "@huggingface/jinja";
import type { Tokenizer } from "./tokenizer.ts";

export interface ChatMessage {
  role: string;
  content: string;
}

export interface ChatOptions {
  /** End with the cue for the assistant's turn. Default true. */
  addGenerationPrompt?: boolean;
  /** Which named template to use ("default" when omitted); an unknown name is an error. */
  templateName?: string;
}

export class ChatTemplateError extends Error {}

export interface TemplateVariables {
  bos_token: string;
  eos_token: string;
  add_generation_prompt: boolean;
}

/** Renders a Jinja chat template; parse and render failures become ChatTemplateError. */
export function renderChatTemplate(template: string, messages: ChatMessage[], vars: TemplateVariables): string {
  let parsed: Template;
  try {
    parsed = new Template(template);
  } catch (e) {
    throw new ChatTemplateError(`chat template does not parse: ${(e as Error).message}`);
  }
  try {
    return parsed.render({ messages, ...vars });
  } catch (e) {
    throw new ChatTemplateError(`chat template failed to render: ${(e as Error).message}`);
  }
}

/**
 * The prompt for models without a chat template: one line `role: content` per message,
 * joined with "\n", then a final line "assistant:" when a generation prompt is wanted:
 *
 *   system: You are terse.
 *   user: Hi
 *   assistant:
 */
export function plainChatPrompt(messages: ChatMessage[], addGenerationPrompt = true): string {
  const lines = messages.map((m) => `${m.role}: ${m.content}`);
  if (addGenerationPrompt) lines.push("assistant:");
  return lines.join("\n");
}

/** The prompt text for `messages`, through the tokenizer's chat template or the plain
 *  fallback. */
export function applyChatTemplate(tokenizer: Tokenizer, messages: ChatMessage[], opts: ChatOptions = {}): string {
  const addGenerationPrompt = opts.addGenerationPrompt ?? true;
  const template = tokenizer.chatTemplate(opts.templateName);
  if (template === null) {
    if (opts.templateName !== undefined) {
      throw new ChatTemplateError(`the model has no chat template named ${JSON.stringify(opts.templateName)}`);
    }
    return plainChatPrompt(messages, addGenerationPrompt);
  }
  return renderChatTemplate(template, messages, {
    bos_token: tokenizer.bosId === null ? "" : (tokenizer.idToToken(tokenizer.bosId) ?? ""),
    eos_token: tokenizer.eosIds.length === 0 ? "" : (tokenizer.idToToken(tokenizer.eosIds[0]) ?? ""),
    add_generation_prompt: addGenerationPrompt,
  });
}

/** Token ids of the chat prompt. Templates usually write the BOS text themselves, so
 *  the tokenizer adds BOS/EOS only when the rendered text does not start with BOS. */
export function encodeChat(tokenizer: Tokenizer, messages: ChatMessage[], opts: ChatOptions = {}): number[] {
  const text = applyChatTemplate(tokenizer, messages, opts);
  const bos = tokenizer.bosId === null ? undefined : tokenizer.idToToken(tokenizer.bosId);
  const startsWithBos = bos !== undefined && bos.length > 0 && text.startsWith(bos);
  return tokenizer.encode(text, { addSpecial: !startsWithBos });
}

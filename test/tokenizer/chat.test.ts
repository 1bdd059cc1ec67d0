// Chat prompts: Jinja templates from tokenizer_config.json / GGUF metadata, the plain
// fallback, and template errors.

import { describe, expect, test } from "bun:test";
import {
  applyChatTemplate,
  ChatTemplateError,
  encodeChat,
  ggufTokenizer,
  hfTokenizer,
  plainChatPrompt,
  type ChatMessage,
} from "../../src/tokenizer/index.ts";
import { ggufMetadata, ggufTok, hfTok, tokenizerConfig, tokenizerJson } from "./helpers.ts";

const CHATML =
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

// Llama-2 style: writes bos_token/eos_token and refuses a bad role order.
const LLAMA2 =
  "{{ bos_token }}{% for message in messages %}" +
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}" +
  "{% endfor %}";

const MESSAGES: ChatMessage[] = [
  { role: "system", content: "Speak as Shakespeare." },
  { role: "user", content: "Who art thou?" },
];

const withHFTemplate = (chat_template: unknown) => hfTokenizer(tokenizerJson, { ...tokenizerConfig, chat_template });
const withGGUFTemplates = (entries: [string, string][]) => ggufTokenizer(new Map([...ggufMetadata, ...entries]));

describe("chat templates", () => {
  test("a ChatML template from tokenizer_config.json", () => {
    const tok = withHFTemplate(CHATML);
    expect(applyChatTemplate(tok, MESSAGES)).toBe(
      "<|im_start|>system\nSpeak as Shakespeare.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n",
    );
    expect(applyChatTemplate(tok, MESSAGES, { addGenerationPrompt: false })).toBe(
      "<|im_start|>system\nSpeak as Shakespeare.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n",
    );
  });

  test("bos_token and eos_token come from the tokenizer, for tokenizer.json and GGUF alike", () => {
    const turns: ChatMessage[] = [
      { role: "user", content: "Hail" },
      { role: "assistant", content: "Well met" },
      { role: "user", content: "Farewell" },
    ];
    const expected = "<s>[INST] Hail [/INST] Well met</s>[INST] Farewell [/INST]";
    expect(applyChatTemplate(withHFTemplate(LLAMA2), turns)).toBe(expected);
    expect(applyChatTemplate(withGGUFTemplates([["tokenizer.chat_template", LLAMA2]]), turns)).toBe(expected);
  });

  test("a list of named templates; the default is used unless a name is given", () => {
    const tok = withHFTemplate([
      { name: "default", template: CHATML },
      { name: "plain", template: "{% for m in messages %}{{ m.content }}|{% endfor %}" },
    ]);
    expect(applyChatTemplate(tok, MESSAGES)).toStartWith("<|im_start|>system");
    expect(applyChatTemplate(tok, MESSAGES, { templateName: "plain" })).toBe("Speak as Shakespeare.|Who art thou?|");
    expect(() => applyChatTemplate(tok, MESSAGES, { templateName: "tool_use" })).toThrow(
      /no chat template named "tool_use"/,
    );
    const gguf = withGGUFTemplates([["tokenizer.chat_template.plain", "{{ messages[0].role }}"]]);
    expect(gguf.chatTemplate()).toBeNull();
    expect(applyChatTemplate(gguf, MESSAGES, { templateName: "plain" })).toBe("system");
  });

  test("encodeChat adds BOS only when the template did not write it", () => {
    const llama2 = encodeChat(withHFTemplate(LLAMA2), [{ role: "user", content: "Hail" }]);
    expect(llama2.filter((id) => id === 1)).toEqual([1]);
    expect(llama2[0]).toBe(1);
    const chatml = encodeChat(withHFTemplate(CHATML), MESSAGES);
    expect(chatml[0]).toBe(1);
  });

  test("template errors are clear", () => {
    expect(() => applyChatTemplate(withHFTemplate("{% for m in messages %}{{ m.content }"), MESSAGES)).toThrow(
      ChatTemplateError,
    );
    expect(() => applyChatTemplate(withHFTemplate("{% for m in messages %}"), MESSAGES)).toThrow(/does not parse/);
    expect(() => applyChatTemplate(withHFTemplate(LLAMA2), [{ role: "assistant", content: "x" }])).toThrow(
      /failed to render: .*roles must alternate/,
    );
    expect(() => withHFTemplate(42)).toThrow(/chat_template must be a string or a list/);
  });
});

describe("plain fallback", () => {
  test("the vendored model has no template, so the fallback is used", () => {
    for (const tok of [hfTok, ggufTok]) {
      expect(tok.chatTemplate()).toBeNull();
      expect(applyChatTemplate(tok, MESSAGES)).toBe("system: Speak as Shakespeare.\nuser: Who art thou?\nassistant:");
    }
  });

  test("format", () => {
    expect(plainChatPrompt(MESSAGES, false)).toBe("system: Speak as Shakespeare.\nuser: Who art thou?");
    expect(plainChatPrompt([])).toBe("assistant:");
  });
});

"""The client against a real `specinfer serve` on the embedded pair, compared with the
same requests through the TypeScript API (`specinfer generate --json`)."""

from __future__ import annotations

import io
import os
import signal
import time
import unittest

import specinfer as ff

from .helpers import SERVER_COMMAND, ts_chat, ts_generate

PROMPT = "ROMEO:"
# A fixed tree, so the requests speculate whatever the server's cost model would choose.
TREE = {"tree": "1,1,3"}


class ServedEmbeddedPair(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.log = io.StringIO()
        cls.llm = ff.LLM(server_command=SERVER_COMMAND, log=cls.log)
        cls.llm.compile(ff.GenerationConfig(do_sample=False))
        cls.llm.start_server()

    @classmethod
    def tearDownClass(cls):
        cls.llm.stop_server()

    def test_greedy_generate_equals_the_typescript_api(self):
        expected = ts_generate(PROMPT, 32)
        result = self.llm.generate(PROMPT, max_new_tokens=32)[0]
        self.assertEqual(result.output_text, expected["text"])
        self.assertEqual(result.output_tokens, expected["tokens"])
        self.assertEqual(result.finish_reason, "length")
        self.assertEqual(result.prompt_tokens, expected["stats"]["promptTokens"])

    def test_speculation_stats_agree_with_the_per_token_draft_flags(self):
        result = self.llm.generate(PROMPT, max_new_tokens=48, speculation=TREE)[0]
        self.assertEqual(len(result.from_draft), 48)
        # Tokens a step accepted past max_new_tokens count as accepted but are not emitted.
        self.assertLessEqual(sum(result.from_draft), result.accepted_tokens)
        self.assertLessEqual(result.accepted_tokens, result.draft_tokens)
        self.assertGreater(sum(result.from_draft), 0, "a fixed tree on the embedded pair accepts some drafts")
        self.assertGreaterEqual(result.mean_accepted_length, 1.0)

    def test_without_speculation_no_token_comes_from_a_draft_and_the_text_is_the_same(self):
        speculative = self.llm.generate(PROMPT, max_new_tokens=32)[0]
        plain = self.llm.generate(PROMPT, max_new_tokens=32, speculation=False)[0]
        self.assertEqual(plain.output_text, speculative.output_text)
        self.assertEqual((plain.draft_tokens, sum(plain.from_draft)), (0, 0))

    def test_a_list_of_prompts_gives_results_in_order_each_equal_to_the_prompt_alone(self):
        prompts = ["ROMEO:", "JULIET:\nO", "KING HENRY:", "First Citizen:\nWe"]
        batch = self.llm.generate(prompts, max_new_tokens=24)
        self.assertEqual(len(batch), len(prompts))
        for prompt, result in zip(prompts, batch):
            alone = ts_generate(prompt, 24)
            self.assertEqual((result.output_text, result.output_tokens), (alone["text"], alone["tokens"]), prompt)

    def test_a_conversation_goes_through_the_chat_template_as_in_the_typescript_chat(self):
        expected = ts_chat("Who art thou?", 24)
        conversation = [{"role": "user", "content": "Who art thou?"}]
        results = self.llm.generate(conversation, max_new_tokens=24)
        self.assertEqual([r.output_text for r in results], [expected])
        self.assertEqual("".join(self.llm.generate(conversation, max_new_tokens=24, stream=True)), expected)
        self.assertEqual([r.output_text for r in self.llm.generate([conversation, conversation], max_new_tokens=24)], [expected, expected])

    def test_streamed_pieces_arrive_one_by_one_and_join_to_the_unstreamed_text(self):
        whole = self.llm.generate(PROMPT, max_new_tokens=32, speculation=TREE)[0]
        stream = self.llm.generate(PROMPT, max_new_tokens=32, speculation=TREE, stream=True)
        pieces = list(stream)
        self.assertGreater(len(pieces), 1)
        self.assertEqual("".join(pieces), whole.output_text)
        self.assertEqual(stream.result.output_text, whole.output_text)
        self.assertEqual(stream.result.output_tokens, whole.output_tokens)
        self.assertEqual(len(stream.result.from_draft), 32)
        self.assertEqual(stream.result.finish_reason, "length")
        self.assertEqual(stream.result.from_draft, whole.from_draft)

    def test_a_stop_string_ends_the_output_before_its_first_occurrence(self):
        full = self.llm.generate(PROMPT, max_new_tokens=48)[0].output_text
        stop = next(w for w in full.split() if len(w) >= 3 and full.index(w) > 0)
        expected = full[: full.index(stop)]
        result = self.llm.generate(PROMPT, max_new_tokens=48, stop=stop)[0]
        self.assertEqual(result.output_text, expected)
        self.assertEqual(result.finish_reason, "stop")
        self.assertEqual("".join(self.llm.generate(PROMPT, max_new_tokens=48, stop=[stop], stream=True)), expected)

    def test_an_out_of_range_setting_raises_api_error_with_message_type_and_param(self):
        with self.assertRaises(ff.APIError) as caught:
            self.llm.generate(PROMPT, generation_config=ff.GenerationConfig(do_sample=True, topp=1.5))
        e = caught.exception
        self.assertEqual((e.status, e.type, e.param), (400, "invalid_request_error", "top_p"))
        self.assertIn("top_p", e.message)

    def test_a_request_past_the_context_is_refused_naming_max_tokens_also_when_streaming(self):
        for stream in (False, True):
            with self.assertRaises(ff.APIError) as caught:
                self.llm.generate(PROMPT, max_new_tokens=100000, stream=stream)
            self.assertEqual((caught.exception.status, caught.exception.param), (400, "max_tokens"))

    def test_attaching_by_url_gives_the_same_output_and_leaves_the_server_running(self):
        attached = ff.LLM(url=self.llm.base_url)
        with attached:
            result = attached.generate(PROMPT, max_new_tokens=16)[0]
        self.assertEqual(result.output_text, self.llm.generate(PROMPT, max_new_tokens=16)[0].output_text)
        self.assertIsNone(attached.server_pid)
        self.assertEqual(self.llm.generate(PROMPT, max_new_tokens=4)[0].finish_reason, "length")

    def test_a_frozen_server_makes_requests_fail_after_the_timeout_not_hang(self):
        attached = ff.LLM(url=self.llm.base_url, timeout=1.0).start_server()
        os.kill(self.llm.server_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with self.assertRaisesRegex(ff.ServerError, "timeout"):
                attached.generate(PROMPT, max_new_tokens=8)
            self.assertLess(time.monotonic() - started, 5)
        finally:
            os.kill(self.llm.server_pid, signal.SIGCONT)

    def test_generate_without_a_server_says_to_start_one(self):
        with self.assertRaisesRegex(ff.ServerError, "start_server"):
            ff.LLM().generate(PROMPT)

    def test_prompts_of_the_wrong_type_are_refused(self):
        with self.assertRaisesRegex(TypeError, "list of strings"):
            self.llm.generate([PROMPT, 7])
        with self.assertRaisesRegex(ValueError, "one prompt"):
            self.llm.generate([PROMPT, PROMPT], stream=True)


if __name__ == "__main__":
    unittest.main()

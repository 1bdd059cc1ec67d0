"""Client pieces that need no model: the event-stream parser, error mapping, settings
validation, finding the server command, and how requests end when a server misbehaves."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

import specinfer as ff
from specinfer.config import runtime_setting
from specinfer.http import Endpoint, error_from_response, sse_events
from specinfer.process import COMMAND_ENV, free_port, locate_server_command


class EventStreamParsing(unittest.TestCase):
    def test_blank_lines_end_events_and_multiline_data_joins_with_newlines(self):
        lines = ["data: {\"a\":1}", "", "data: first", "data: second", "", "data: [DONE]", ""]
        self.assertEqual(list(sse_events(iter(lines))), ['{"a":1}', "first\nsecond", "[DONE]"])

    def test_comments_and_other_fields_are_skipped(self):
        lines = [": keepalive", "event: message", "id: 7", "retry: 10", "data: x", ""]
        self.assertEqual(list(sse_events(iter(lines))), ["x"])

    def test_only_one_space_after_the_colon_is_dropped(self):
        self.assertEqual(list(sse_events(iter(["data:x", "", "data:  y", ""]))), ["x", " y"])

    def test_a_last_event_without_a_blank_line_still_counts(self):
        self.assertEqual(list(sse_events(iter(["data: tail"]))), ["tail"])


class ErrorMapping(unittest.TestCase):
    def test_openai_error_body_gives_message_type_param_code_and_status(self):
        raw = b'{"error":{"message":"top_p: too big","type":"invalid_request_error","param":"top_p","code":null}}'
        e = error_from_response(400, raw)
        self.assertIsInstance(e, ff.APIError)
        self.assertEqual((e.message, e.type, e.param, e.code, e.status), ("top_p: too big", "invalid_request_error", "top_p", None, 400))
        self.assertIn("top_p", str(e))

    def test_a_body_that_is_not_json_becomes_the_message(self):
        e = error_from_response(502, b"Bad Gateway from proxy")
        self.assertEqual((e.message, e.status, e.type), ("Bad Gateway from proxy", 502, None))


class InitSettings(unittest.TestCase):
    def tearDown(self):
        ff.init()

    def test_keywords_are_validated_as_flexflow_does(self):
        with self.assertRaisesRegex(TypeError, "num_gpus"):
            ff.init(num_gpus="4")
        with self.assertRaisesRegex(ValueError, "memory_per_gpu"):
            ff.init(memory_per_gpu=0)
        with self.assertRaisesRegex(TypeError, "offload"):
            ff.init(offload="yes")

    def test_a_dict_and_keywords_together_are_refused(self):
        with self.assertRaisesRegex(ValueError, "not both"):
            ff.init({"num_gpus": 1}, num_gpus=1)

    def test_unknown_settings_are_named(self):
        with self.assertRaisesRegex(ValueError, "num_tpus"):
            ff.init({"num_tpus": 1})

    def test_the_tensor_parallelism_degree_is_kept_for_the_server(self):
        ff.init(num_gpus=4, memory_per_gpu=14000, zero_copy_memory_per_node=30000, tensor_parallelism_degree=4)
        self.assertEqual(runtime_setting("tensor_parallelism_degree"), 4)


class GenerationConfigFields(unittest.TestCase):
    def test_greedy_unless_do_sample(self):
        self.assertEqual(ff.GenerationConfig(do_sample=False, temperature=0.9, topp=0.8, topk=5).request_fields(), {"temperature": 0})
        self.assertEqual(
            ff.GenerationConfig(do_sample=True, temperature=0.7, topp=0.9, topk=40).request_fields(),
            {"temperature": 0.7, "top_p": 0.9, "top_k": 40},
        )

    def test_wrong_types_name_the_field(self):
        with self.assertRaisesRegex(TypeError, "temperature"):
            ff.GenerationConfig(temperature="hot")
        with self.assertRaisesRegex(TypeError, "topk"):
            ff.GenerationConfig(topk=1.5)


def make_project(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src" / "cli.ts").write_text("")
    (root / "package.json").write_text('{"name": "specinfer"}')
    (root / "node_modules" / ".bin").mkdir(parents=True)
    (root / "node_modules" / ".bin" / "bun").write_text("")


class FindingTheServer(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        patcher = mock.patch.dict(os.environ, {COMMAND_ENV: "", "PATH": str(self.tmp / "empty")})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_a_checkout_without_dist_runs_the_sources_with_its_bun(self):
        make_project(self.tmp)
        self.assertEqual(locate_server_command(search_from=[self.tmp / "src"]), [str(self.tmp / "node_modules/.bin/bun"), str(self.tmp / "src/cli.ts")])

    def test_the_built_executable_is_preferred(self):
        make_project(self.tmp)
        exe = self.tmp / "dist" / "specinfer"
        exe.parent.mkdir()
        exe.write_text("")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        self.assertEqual(locate_server_command(search_from=[self.tmp]), [str(exe)])

    def test_the_environment_variable_and_the_argument_win(self):
        make_project(self.tmp)
        with mock.patch.dict(os.environ, {COMMAND_ENV: "/opt/bun '/a b/cli.ts'"}):
            self.assertEqual(locate_server_command(search_from=[self.tmp]), ["/opt/bun", "/a b/cli.ts"])
            self.assertEqual(locate_server_command(["/x/specinfer"], search_from=[self.tmp]), ["/x/specinfer"])

    def test_a_package_json_of_another_project_is_not_a_checkout(self):
        make_project(self.tmp)
        (self.tmp / "package.json").write_text('{"name": "other"}')
        with self.assertRaisesRegex(ff.ServerError, "cannot find specinfer"):
            locate_server_command(search_from=[self.tmp])


class MisbehavingServer:
    """A one-connection TCP server that reads a request, then does `behaviour`."""

    def __init__(self, behaviour: str):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.behaviour = behaviour
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        conn.recv(65536)
        if self.behaviour == "half-stream":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            event = b'data: {"choices":[{"index":0,"text":"Hi"}]}\n\n'
            conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
        if self.behaviour == "error-event":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            conn.sendall(b'data: {"choices":[{"index":0,"text":"Hi"}]}\n\n')
            conn.sendall(b'data: {"error":{"message":"engine step failed","type":"server_error","param":null,"code":null}}\n\n')
        if self.behaviour == "silent":
            self.release.wait(10)
        conn.close()
        self.sock.close()

    def close(self):
        self.release.set()
        self.thread.join(5)


class RequestsNeverHang(unittest.TestCase):
    def serve(self, behaviour):
        server = MisbehavingServer(behaviour)
        self.addCleanup(server.close)
        return Endpoint(server.url, timeout=1.0)

    def test_a_connection_closed_before_the_answer_raises_server_error(self):
        with self.assertRaisesRegex(ff.ServerError, "closed the connection"):
            self.serve("close").post_sse("/completions", {"prompt": "x"})

    def test_a_stream_cut_off_before_done_raises_after_the_pieces_received(self):
        events = self.serve("half-stream").post_sse("/completions", {"prompt": "x"})
        self.assertEqual(next(events)["choices"][0]["text"], "Hi")
        with self.assertRaises(ff.ServerError):
            next(events)

    def test_an_error_event_mid_stream_raises_api_error_after_the_pieces_received(self):
        events = self.serve("error-event").post_sse("/completions", {"prompt": "x"})
        self.assertEqual(next(events)["choices"][0]["text"], "Hi")
        with self.assertRaises(ff.APIError) as caught:
            next(events)
        self.assertEqual((caught.exception.message, caught.exception.type), ("engine step failed", "server_error"))

    def test_a_silent_server_raises_after_the_timeout(self):
        started = time.monotonic()
        with self.assertRaisesRegex(ff.ServerError, "timeout"):
            self.serve("silent").post_sse("/completions", {"prompt": "x"})
        self.assertLess(time.monotonic() - started, 5)

    def test_nothing_listening_raises_server_error(self):
        url = f"http://127.0.0.1:{free_port()}/v1"
        with self.assertRaisesRegex(ff.ServerError, "ConnectionRefused"):
            Endpoint(url, timeout=1.0).get_json("/models")

if __name__ == "__main__":
    unittest.main()

"""The server child's life: started on demand, errors forwarded, never outliving Python
(stop_server, normal exit, SIGTERM, SIGKILL), and a death mid-request raising at once."""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

import specinfer as ff

from .helpers import REPO_ROOT, SERVER_COMMAND, kill_quietly, process_gone, python_with_client, read_pid_line, wait_gone

DRAFT = str(REPO_ROOT / "models" / "llama-shakespeare-1.4m-draft")


def start_in_child_script(then: str) -> str:
    """Python code that starts a server, prints its PID, then runs `then`."""
    return textwrap.dedent(
        f"""
        import io, sys, time
        import specinfer as ff
        llm = ff.LLM(server_command={SERVER_COMMAND!r}, log=io.StringIO())
        llm.start_server()
        print("PID", llm.server_pid, flush=True)
        {then}
        """
    )


class ServerLifetime(unittest.TestCase):
    def test_leaving_the_with_block_stops_the_server_and_reaps_it(self):
        with ff.LLM(server_command=SERVER_COMMAND, log=io.StringIO()) as llm:
            pid = llm.server_pid
            self.assertFalse(process_gone(pid))
            self.assertEqual(llm.generate("ROMEO:", max_new_tokens=4)[0].finish_reason, "length")
        self.assertTrue(process_gone(pid))
        self.assertIsNone(llm.server_pid)

    def check_server_dies_with_python(self, then: str, signal_to_python=None):
        script = python_with_client(start_in_child_script(then))
        pid = None
        try:
            pid = read_pid_line(script)
            if signal_to_python is not None:
                script.send_signal(signal_to_python)
            script.wait(timeout=30)
            self.assertTrue(wait_gone(pid), f"server {pid} outlived its Python process")
        finally:
            kill_quietly([script.pid] + ([pid] if pid else []))
            script.communicate()

    def test_the_server_stops_when_python_exits_without_stop_server(self):
        self.check_server_dies_with_python("sys.exit(0)")

    def test_the_server_stops_when_python_is_terminated(self):
        self.check_server_dies_with_python("time.sleep(60)", signal.SIGTERM)

    def test_the_server_stops_when_python_is_killed(self):
        self.check_server_dies_with_python("time.sleep(60)", signal.SIGKILL)

    def test_a_server_killed_mid_stream_raises_and_later_calls_say_it_exited(self):
        llm = ff.LLM(server_command=SERVER_COMMAND, log=io.StringIO()).start_server()
        try:
            stream = llm.generate("ROMEO:", max_new_tokens=240, stream=True)
            next(stream)
            os.kill(llm.server_pid, signal.SIGKILL)
            started = time.monotonic()
            with self.assertRaises(ff.ServerError):
                for _ in stream:
                    pass
            self.assertLess(time.monotonic() - started, 5)
            with self.assertRaisesRegex(ff.ServerError, "exited"):
                llm.generate("ROMEO:", max_new_tokens=4)
        finally:
            llm.stop_server()


class ApiKey(unittest.TestCase):
    def test_a_started_server_gets_the_key_and_a_client_without_it_gets_a_401(self):
        with ff.LLM(api_key="sesame", server_command=SERVER_COMMAND, log=io.StringIO()) as llm:
            self.assertEqual(llm.generate("ROMEO:", max_new_tokens=4)[0].finish_reason, "length")
            self.assertNotIn("sesame", Path(f"/proc/{llm.server_pid}/cmdline").read_text())
            with self.assertRaises(ff.APIError) as caught:
                ff.LLM(url=llm.base_url).start_server()
            self.assertEqual((caught.exception.status, caught.exception.type), (401, "authentication_error"))


class StartingErrors(unittest.TestCase):
    def test_a_missing_model_path_is_named_before_anything_starts(self):
        with self.assertRaisesRegex(FileNotFoundError, "/no/such/model"):
            ff.LLM("/no/such/model", server_command=SERVER_COMMAND).start_server()
        llm = ff.LLM(server_command=SERVER_COMMAND)
        llm.compile(ssms=[ff.SSM("/no/such/draft")])
        with self.assertRaisesRegex(FileNotFoundError, "/no/such/draft"):
            llm.start_server()

    def test_a_model_the_server_cannot_load_raises_with_the_servers_own_message(self):
        model = Path(tempfile.mkdtemp()) / "broken-model"
        model.mkdir()
        (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]')
        started = time.monotonic()
        with self.assertRaises(ff.ServerError) as caught:
            ff.LLM(str(model), server_command=SERVER_COMMAND, log=io.StringIO()).start_server()
        self.assertRegex(str(caught.exception), r"exited with code [12] before it was ready")
        self.assertIn(str(model), str(caught.exception))
        self.assertLess(time.monotonic() - started, 30)

    def test_settings_become_serve_flags_and_a_failing_server_reports_its_output(self):
        tmp = Path(tempfile.mkdtemp())
        argv_file = tmp / "argv"
        fake = tmp / "fake_serve.py"
        fake.write_text(
            "import sys\n"
            f"open({str(argv_file)!r}, 'w').write('\\n'.join(sys.argv[1:]))\n"
            "print('specinfer: --tp is not supported', file=sys.stderr)\n"
            "sys.exit(2)\n"
        )
        ff.init(num_gpus=2, memory_per_gpu=1000, zero_copy_memory_per_node=1000, tensor_parallelism_degree=2)
        self.addCleanup(ff.init)
        llm = ff.LLM(str(REPO_ROOT / "models" / "llama-shakespeare-8m"), server_command=[sys.executable, str(fake)], log=io.StringIO())
        llm.compile(ff.GenerationConfig(), max_requests_per_batch=4, max_seq_length=128, max_tokens_per_batch=64, ssms=[ff.SSM(DRAFT)])
        with self.assertRaisesRegex(ff.ServerError, r"exited with code 2[\s\S]*--tp is not supported"):
            llm.start_server()
        args = argv_file.read_text().split("\n")
        self.assertEqual(args[:3], ["serve", "--host", "127.0.0.1"])
        flags = args[5:]
        self.assertEqual(
            flags,
            ["--model", str(REPO_ROOT / "models" / "llama-shakespeare-8m"), "--max-seqs", "4", "--ctx-size", "128", "--batch-size", "64", "--tp", "2", "--ssm", DRAFT],
        )


if __name__ == "__main__":
    unittest.main()

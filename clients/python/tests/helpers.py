"""Paths and small utilities shared by the tests."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from specinfer.process import COMMAND_ENV

CLIENT_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = CLIENT_DIR.parents[1]
BUN = REPO_ROOT / "node_modules" / ".bin" / "bun"
CLI = REPO_ROOT / "src" / "cli.ts"
# The sources, not a possibly older dist/specinfer: the tests compare with the TS CLI.
# SPECINFER_SERVER_COMMAND (the client's own override) points them at another build.
SERVER_COMMAND = shlex.split(os.environ.get(COMMAND_ENV, "")) or [str(BUN), str(CLI)]


def ts_generate(prompt: str, max_tokens: int, *extra: str) -> Dict:
    """The same greedy request through the TypeScript API (`specinfer generate --json`)."""
    out = subprocess.run(
        [*SERVER_COMMAND, "generate", "--json", "--temperature", "0", "--max-tokens", str(max_tokens), "--prompt", prompt, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def ts_chat(user_message: str, max_tokens: int) -> str:
    """The assistant's greedy reply to one user turn through `specinfer chat`."""
    out = subprocess.run(
        [*SERVER_COMMAND, "chat", "--temperature", "0", "--max-tokens", str(max_tokens)],
        input=user_message + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    if not out.stdout.endswith("\n"):
        raise AssertionError(f"specinfer chat printed {out.stdout!r}")
    return out.stdout[:-1]


def process_gone(pid: int) -> bool:
    """True once pid no longer runs (absent, or a zombie waiting for its new parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)


def python_with_client(code: str) -> subprocess.Popen:
    """A separate Python process running `code` with this client importable."""
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_pid_line(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()
    if not line.startswith("PID "):
        raise AssertionError(f"expected 'PID n' from the script, got {line!r}; stderr:\n{proc.stderr.read()}")
    return int(line.split()[1])


def kill_quietly(pids: List[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""Finding and running `specinfer serve` as a child process that never outlives Python.

Three guards stop the child: an atexit hook (normal exit, uncaught exceptions, Ctrl-C),
SIGTERM/SIGHUP handlers (installed only where Python's default action would kill us
without running atexit), and on Linux PR_SET_PDEATHSIG, which the kernel honours even
when Python is SIGKILLed.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, TextIO

from .errors import ServerError
from .http import status_of

COMMAND_ENV = "SPECINFER_SERVER_COMMAND"


def is_project_root(path: Path) -> bool:
    """A checkout of the specinfer repository (package.json named specinfer + src/cli.ts)."""
    try:
        package = json.loads((path / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(package, dict) and package.get("name") == "specinfer" and (path / "src" / "cli.ts").is_file()


def project_command(root: Path) -> List[str]:
    """The built executable dist/specinfer when there is one, else Bun running the sources."""
    executable = root / "dist" / "specinfer"
    if executable.is_file() and os.access(executable, os.X_OK):
        return [str(executable)]
    local_bun = root / "node_modules" / ".bin" / "bun"
    bun = str(local_bun) if local_bun.exists() else shutil.which("bun")
    if bun is None:
        raise ServerError(f"found the specinfer project at {root} but no Bun to run it: run `npm install` there")
    return [bun, str(root / "src" / "cli.ts")]


def locate_server_command(explicit: Optional[Sequence[str]] = None, search_from: Sequence[Path] = ()) -> List[str]:
    """The command line that `serve ...` is appended to. In order: the argument, the
    SPECINFER_SERVER_COMMAND environment variable, a specinfer checkout above this
    package or the current directory, a `specinfer` on PATH."""
    if explicit:
        return shlex.split(explicit) if isinstance(explicit, str) else list(explicit)
    from_env = os.environ.get(COMMAND_ENV, "").strip()
    if from_env:
        return shlex.split(from_env)
    starts = list(search_from) or [Path(__file__).resolve().parent, Path.cwd()]
    for start in starts:
        for candidate in [start, *start.parents]:
            if is_project_root(candidate):
                return project_command(candidate)
    on_path = shutil.which("specinfer")
    if on_path:
        return [on_path]
    raise ServerError(
        "cannot find specinfer: put the `specinfer` executable on PATH, run from a specinfer "
        f"checkout, or set {COMMAND_ENV} (e.g. \"/path/to/specinfer\" or \"bun /path/to/src/cli.ts\")"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `specinfer serve` child: started on a free local port, ready once /health says 200."""

    def __init__(self, command: Sequence[str], args: Sequence[str], env: Optional[Dict[str, str]] = None, log: Optional[TextIO] = None):
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.argv = [*command, "serve", "--host", self.host, "--port", str(self.port), *args]
        self._env = env
        self._log = log
        self._tail: Deque[str] = collections.deque(maxlen=40)
        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float) -> None:
        _install_signal_handlers()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # a terminal's Ctrl-C reaches Python, which then stops the child
                preexec_fn=_die_with_parent_hook(),
            )
        except OSError as e:
            raise ServerError(f"cannot run {self.argv[0]}: {e}") from e
        _live.add(self)
        self._reader = threading.Thread(target=self._forward_output, name=f"specinfer-serve-{self.pid}", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._reader.join(timeout=2)  # let the last lines arrive
                raise ServerError(f"specinfer serve exited with code {code} before it was ready:\n{self.output_tail()}")
            if status_of(self.url + "/health", timeout=2) == 200:
                return
            time.sleep(0.05)
        raise ServerError(f"specinfer serve was not ready within {timeout:g} s:\n{self.output_tail()}")

    def _forward_output(self) -> None:
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self._tail.append(line)
            log = self._log or sys.stderr
            try:
                log.write(f"[specinfer serve] {line}\n")
                log.flush()
            except (OSError, ValueError):
                pass  # a closed log must not stop the pipe from draining
        self._proc.stdout.close()

    def output_tail(self) -> str:
        return "\n".join(self._tail) or "(no output)"

    def running_after(self, seconds: float) -> bool:
        """Whether the child still runs after waiting up to `seconds` for it to exit."""
        try:
            self._proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.returncode if self._proc else None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the child's process group, SIGKILL after `grace` seconds; reaps it."""
        proc = self._proc
        _live.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own session, so its pgid is its pid
    except ProcessLookupError:
        pass


_live: "set[ServerProcess]" = set()


def _stop_all() -> None:
    for server in list(_live):
        server.stop(grace=2.0)


atexit.register(_stop_all)

_handled_signals: List[int] = []


def _install_signal_handlers() -> None:
    """On SIGTERM/SIGHUP, stop the children, then die of the same signal as before. Only
    replaces the default action, and only from the main thread (where Python allows it)."""
    if _handled_signals or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _stop_all_then_reraise)
            _handled_signals.append(sig)


def _stop_all_then_reraise(signum: int, _frame: object) -> None:
    _stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _die_with_parent_hook():
    """On Linux, a function for Popen's preexec_fn asking the kernel to SIGKILL the child
    when its parent goes. The kernel ties this to the *thread* that forked, so it is used
    only from the main thread, whose end is the process's end."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook

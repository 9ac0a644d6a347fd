"""One way to run a llama-grpc server as a child process: the stack launcher, the tests and the
benchmarks all use ``ServiceProcess``.

    ``python -m MODULE ARGS --host H --port P --metrics-port M`` (free ports unless given), its output
    in a log file, or with ``on_line`` handed over line by line (the stack prints them). With
    ``die_with_parent`` it gets SIGTERM when the thread that started it dies (the stack: no server
    outlives it, even after a SIGKILL).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from llama_grpc_runtime.health import is_serving

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout (services start from here)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """The child gets SIGTERM when its parent dies (even by SIGKILL): no orphaned servers."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServiceProcess:
    def __init__(self, module: str, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, metrics_port: int | None = None,
                 on_line: Callable[[str], None] | None = None, die_with_parent: bool = False) -> None:
        self.module = module
        self.port = port or free_port()
        self.metrics_port = free_port() if metrics_port is None else metrics_port
        self.address = f"{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"
        self.last_lines: list[str] = []  # with on_line: the latest output, for error messages
        command = [sys.executable, "-m", module, *args, "--host", host, "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port)]
        self._log = None if on_line else tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log",
                                                                     delete=False)
        self.log_path = Path(self._log.name) if self._log else None
        self.process = subprocess.Popen(
            command, cwd=SOURCE_ROOT, stdout=self._log or subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        self._reader = None
        if on_line is not None:
            self._reader = threading.Thread(target=self._relay, args=(on_line,), daemon=True)
            self._reader.start()

    def _relay(self, on_line: Callable[[str], None]) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.last_lines = [*self.last_lines[-19:], line]
            on_line(line)

    def wait_healthy(self, timeout: float = 120.0, service: str = "",
                     credentials: grpc.ChannelCredentials | None = None) -> ServiceProcess:
        """Poll health (over TLS with ``credentials``) until SERVING."""
        deadline = time.monotonic() + timeout
        channel = grpc.secure_channel(self.address, credentials) if credentials else grpc.insecure_channel(self.address)
        with channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log_text()}")
                if is_serving(channel, service, timeout=1):
                    return self
                time.sleep(0.1)
        raise TimeoutError(f"{self.module} not healthy after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        if self.log_path is None:
            return "\n".join(self.last_lines)
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def terminate(self) -> None:
        """SIGTERM: the server drains (see ``wait``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The exit code, killing the process if it has not exited within ``timeout`` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self._reader is not None:
                self._reader.join(timeout=2)

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        code = self.wait(timeout)
        if self._log is not None:
            self._log.close()
        return code

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Start a real llama-grpc server as a subprocess on 127.0.0.1 and wait until it is healthy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from llama_grpc_runtime.health import is_serving

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``python -m MODULE ARGS --host 127.0.0.1 --port P --metrics-port M``, logs captured to a file."""

    def __init__(self, module: str, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, metrics_port: int | None = None) -> None:
        self.module = module
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        command = [sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port)]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

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
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

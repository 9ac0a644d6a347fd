"""The container health check (`python -m llama_grpc_runtime.healthcheck`) against a real gRPC health server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llama_grpc_devtools.process import free_port
from tests import REPO

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MODEL_SERVICE = "llama.model.v1.ModelService"


class HealthServer:
    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = "127.0.0.1:0"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self.server.start()

    def set(self, status: int, name: str = "") -> None:
        self.health.set(name, status)


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = HealthServer()
    yield server
    server.server.stop(None)


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    return subprocess.run([sys.executable, "-m", "llama_grpc_runtime.healthcheck", *args], cwd=REPO,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60)


def test_serving_exits_zero_and_not_serving_exits_one(health_server: HealthServer) -> None:
    health_server.set(SERVING)
    done = healthcheck("--service", "model", "--port", str(health_server.port))
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout

    health_server.set(NOT_SERVING)  # what a server says while loading or draining
    done = healthcheck("--service", "model", "--port", str(health_server.port))
    assert done.returncode == 1
    assert "NOT_SERVING" in done.stdout


def test_alive_accepts_not_serving_but_not_silence(health_server: HealthServer) -> None:
    health_server.set(NOT_SERVING)  # a gateway waiting for its upstreams is alive, only not ready
    assert healthcheck("--service", "gateway", "--port", str(health_server.port), "--alive").returncode == 0
    done = healthcheck("--service", "gateway", "--port", str(free_port()), "--alive", "--timeout", "1")
    assert done.returncode == 1


def test_port_comes_from_the_servers_own_environment_variable(health_server: HealthServer) -> None:
    health_server.set(SERVING)
    done = healthcheck("--service", "tokenizer", env={"LLAMA_TOKENIZER_PORT": str(health_server.port)})
    assert done.returncode == 0, done.stderr
    # the gateway's variable says nothing about the tokenizer's port
    done = healthcheck("--service", "tokenizer", "--timeout", "1",
                       env={"LLAMA_GATEWAY_PORT": str(health_server.port),
                            "LLAMA_TOKENIZER_PORT": str(free_port())})
    assert done.returncode == 1


def test_named_service_is_checked_separately(health_server: HealthServer) -> None:
    health_server.set(SERVING)
    health_server.set(NOT_SERVING, MODEL_SERVICE)
    port = str(health_server.port)
    assert healthcheck("--service", "model", "--port", port).returncode == 0
    assert healthcheck("--service", "model", "--port", port, "--name", MODEL_SERVICE).returncode == 1


def test_nothing_listening_fails_within_the_timeout() -> None:
    done = healthcheck("--service", "gateway", "--port", str(free_port()), "--timeout", "1")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=llama-gateway.example", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,DNS:llama-gateway.example"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_server_is_checked_over_tls_with_the_servers_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = HealthServer(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    try:
        server.set(SERVING)
        port = str(server.port)
        env = {"LLAMA_GATEWAY_PORT": port, "LLAMA_GATEWAY_TLS_CERT": str(cert)}
        done = healthcheck("--service", "gateway", env=env)
        assert done.returncode == 0, done.stderr
        done = healthcheck("--service", "gateway", env={**env, "LLAMA_HEALTHCHECK_TLS_SERVER_NAME": "llama-gateway.example"})
        assert done.returncode == 0, done.stderr
        # a plaintext check of a TLS port fails: the check really speaks TLS above
        done = healthcheck("--service", "gateway", "--timeout", "2", env={"LLAMA_GATEWAY_PORT": port})
        assert done.returncode == 1
        # a name the certificate does not carry fails verification
        done = healthcheck("--service", "gateway", "--timeout", "2",
                           env={**env, "LLAMA_HEALTHCHECK_TLS_SERVER_NAME": "elsewhere.example"})
        assert done.returncode == 1
    finally:
        server.server.stop(None)

"""The CPU compose variant, run for real without Docker: each service's command, environment and
healthcheck exactly as `docker compose config` renders them, started in compose's order (the gateway
once the others are healthy), one generation through the gateway, then SIGTERM as `docker compose
stop` sends it. Only the ports (and the host the gateway dials) are moved onto free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from llama_grpc_devtools.process import free_port
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.deploy.tools import REPO, compose_config
from tests.pki import Pki, make_pki

ORDER = ("tokenizer", "model", "gateway")


def python(command: list[str]) -> list[str]:
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]


def healthy(command: list[str], env: dict[str, str], process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_cpu_compose_services_start_serve_and_stop(tmp_path: Path, tls: bool) -> None:
    """With docker-compose.tls.yml too: every hop over (mutual) TLS with tokens, the secrets made by
    deploy/make_secrets.py and mounted where compose would (/run/secrets/X -> the file it names)."""
    files = ("docker-compose.yml", "docker-compose.cpu.yml", *(("docker-compose.tls.yml",) if tls else ()))
    secrets_dir = tmp_path / "secrets"
    if tls:
        make_pki(secrets_dir)
    done = compose_config(REPO / "deploy", *files, env={"LLAMA_GRACE_PERIOD": "", "LLAMA_MAX_BATCH_SIZE": "",
                                                        "LLAMA_SECRETS_DIR": str(secrets_dir)})
    assert done.returncode == 0, done.stderr
    rendered = json.loads(done.stdout)
    services = rendered["services"]
    ports = {name: free_port() for name in ORDER}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_") or k == "LLAMA_GRPC_CACHE"}
    processes: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for name in ORDER:
            service = services[name]
            env = {**base_env, **service["environment"], "PYTHONUNBUFFERED": "1"}
            mounted = {secret["target"]: rendered["secrets"][secret["source"]]["file"]
                       for secret in service.get("secrets", [])}
            env = {key: mounted.get(value, value) for key, value in env.items()}
            prefix = f"LLAMA_{name.upper()}"
            env[f"{prefix}_HOST"], env[f"{prefix}_PORT"], env[f"{prefix}_METRICS_PORT"] = \
                "127.0.0.1", str(ports[name]), "0"
            for upstream in ("tokenizer", "model"):  # compose's service names -> loopback
                key = f"LLAMA_GATEWAY_{upstream.upper()}_ADDRESS"
                if key in env:
                    upstream_port = services[upstream]["environment"][f"LLAMA_{upstream.upper()}_PORT"]
                    assert env[key] == f"dns:///{upstream}:{upstream_port}"
                    env[key] = f"dns:///127.0.0.1:{ports[upstream]}"
            for dependency, condition in service.get("depends_on", {}).items():
                assert condition["condition"] == "service_healthy"
                assert dependency in processes, f"{name} depends on {dependency}, which compose starts first"
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "w") as log:
                processes[name] = subprocess.Popen(python(service["command"]), cwd=tmp_path, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT)
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD"
            # 300 s bounds CI; compose itself allows the longer start_period it renders
            assert healthy(python(test[1:]), env, processes[name], 300.0), logs[name].read_text()[-3000:]

        address = f"127.0.0.1:{ports['gateway']}"
        pki = Pki(secrets_dir)
        channel = grpc.secure_channel(address, pki.credentials(None)) if tls else grpc.insecure_channel(address)
        metadata = (("authorization", f"Bearer {pki.token('gateway-tokens')}"),) if tls else ()
        with channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(gateway_pb2.GenerateRequest(
                prompt="The capital of France is",
                sampling=common_pb2.SamplingParams(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=4)), timeout=120, metadata=metadata)
        assert reply.usage.generated_tokens == len(reply.token_ids) == 4
        assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert reply.text

        for name in reversed(ORDER):  # `docker compose stop`: SIGTERM, exit 0 well within the grace
            processes[name].send_signal(getattr(signal, services[name].get("stop_signal", "SIGTERM")))
            assert processes[name].wait(timeout=60) == 0, logs[name].read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

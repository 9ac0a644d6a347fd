"""deploy/docker-compose*.yml: `docker compose config` accepts every variant (the Compose spec's own
validation), and the rules the spec cannot see hold; each check is also run on a broken copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.tools import REPO, compose_config, compose_problems, copy_repo_files, settings_problems

DEPLOY = REPO / "deploy"
VARIANTS = {"gpu": ("docker-compose.yml",), "cpu": ("docker-compose.yml", "docker-compose.cpu.yml"),
            "gpu-tls": ("docker-compose.yml", "docker-compose.tls.yml"),
            "cpu-tls": ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.tls.yml")}
# Unset settings that a developer's shell might carry, so the defaults in the files are what is checked.
CLEAN_ENV = {name: "" for name in ("LLAMA_GPUS", "LLAMA_CHECKPOINT", "LLAMA_MODELS_DIR", "LLAMA_TAG",
                                   "LLAMA_GRACE_PERIOD", "LLAMA_STOP_GRACE_PERIOD", "LLAMA_MAX_BATCH_SIZE",
                                   "LLAMA_SECRETS_DIR")}


def config(deploy: Path, variant: str, **env: str) -> dict:
    done = compose_config(deploy, *VARIANTS[variant], env={**CLEAN_ENV, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_variant_is_valid_and_consistent(variant: str) -> None:
    rendered = config(DEPLOY, variant)
    assert compose_problems(rendered) == []
    settings = {key: value for service in rendered["services"].values()
                for key, value in service.get("environment", {}).items()}
    assert settings_problems(settings) == []


def test_gpu_variant_reserves_gpus_for_the_model_only_and_mounts_the_weights() -> None:
    services = config(DEPLOY, "gpu", LLAMA_GPUS="2", LLAMA_CHECKPOINT="/models/llama-70b")["services"]
    (device,) = services["model"]["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 2, ["gpu"])
    assert services["model"]["environment"]["LLAMA_MODEL_TP"] == "2"
    assert services["model"]["environment"]["LLAMA_MODEL_CHECKPOINT"] == "/models/llama-70b"
    assert services["tokenizer"]["environment"]["LLAMA_TOKENIZER_PATH"] == "/models/llama-70b"
    for name in ("model", "tokenizer"):
        (volume,) = services[name]["volumes"]
        assert (volume["target"], volume["read_only"]) == ("/models", True)
    assert compose_problems(config(DEPLOY, "gpu", LLAMA_GPUS="2")) == []


def test_tls_variant_secures_every_hop_from_secrets() -> None:
    services = config(DEPLOY, "cpu-tls", LLAMA_SECRETS_DIR="/srv/llama-secrets")["services"]
    for name, service in services.items():
        env = service["environment"]
        prefix = f"LLAMA_{name.upper()}"
        assert env[f"{prefix}_TLS_CERT"].startswith("/run/secrets/") and env[f"{prefix}_AUTH_TOKEN_FILE"]
        if name != "gateway":
            assert env[f"{prefix}_TLS_CLIENT_CA"] == "/run/secrets/ca.crt"
    gateway = services["gateway"]["environment"]
    assert gateway["LLAMA_GATEWAY_UPSTREAM_TLS_CERT"] == "/run/secrets/gateway-client.crt"
    assert gateway["LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE"] == "/run/secrets/upstream-tokens"
    files = {secret["file"] for secret in config(DEPLOY, "cpu-tls", LLAMA_SECRETS_DIR="/srv/llama-secrets")[
        "secrets"].values()}
    assert all(file.startswith("/srv/llama-secrets/") for file in files)


def test_cpu_variant_needs_no_gpu_and_no_weights() -> None:
    services = config(DEPLOY, "cpu")["services"]
    for name, service in services.items():
        assert "deploy" not in service, name
        assert not service.get("volumes"), name
        assert service["image"].startswith("llama-grpc-demo:"), name
        assert service["build"]["target"] == "demo", name
    assert services["model"]["environment"]["LLAMA_MODEL_DEVICE"] == "cpu"
    # no checkpoint and no tokenizer path: both services load the embedded model baked into the image
    assert "LLAMA_MODEL_CHECKPOINT" not in services["model"]["environment"]
    assert "LLAMA_TOKENIZER_PATH" not in services["tokenizer"]["environment"]


def test_only_the_gateway_is_published_beyond_loopback() -> None:
    for variant in VARIANTS:
        for name, service in config(DEPLOY, variant)["services"].items():
            public = [port for port in service.get("ports", []) if port.get("host_ip") in (None, "0.0.0.0")]
            assert [port["target"] for port in public] == ([50050] if name == "gateway" else []), (variant, name)


# ---- the same checks on copies broken on purpose -------------------------------------------------

def broken(tmp_path: Path, name: str, old: str, new: str) -> Path:
    deploy = copy_repo_files(tmp_path) / "deploy"
    text = (deploy / name).read_text()
    assert old in text, f"{old!r} not in {name}"
    (deploy / name).write_text(text.replace(old, new, 1))
    return deploy


def test_compose_config_bites_on_a_bad_depends_on_condition(tmp_path: Path) -> None:
    deploy = broken(tmp_path, "docker-compose.yml", "condition: service_healthy", "condition: service_ready")
    for variant in VARIANTS:
        done = compose_config(deploy, *VARIANTS[variant], env=CLEAN_ENV)
        assert done.returncode != 0
        assert "condition" in done.stderr


def test_compose_config_bites_on_a_dependency_on_a_missing_service(tmp_path: Path) -> None:
    deploy = broken(tmp_path, "docker-compose.yml", "      tokenizer:\n        condition: service_healthy",
                    "      tokeniser:\n        condition: service_healthy")
    assert compose_config(deploy, *VARIANTS["gpu"], env=CLEAN_ENV).returncode != 0


def test_compose_config_bites_on_a_broken_override(tmp_path: Path) -> None:
    deploy = broken(tmp_path, "docker-compose.cpu.yml", "    deploy: !reset {}", "    deploy: !reset {}\n    gpus: several")
    assert compose_config(deploy, *VARIANTS["cpu"], env=CLEAN_ENV).returncode != 0


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('      test: ["CMD", "python", "-m", "llama_grpc_runtime.healthcheck", "--service", "model"]',
     '      test: ["CMD", "true"]', "model: healthcheck"),
    ("        condition: service_healthy\n      model:", "        condition: service_started\n      model:",
     "not healthy"),
    ("LLAMA_GATEWAY_MODEL_ADDRESS: dns:///model:50052", "LLAMA_GATEWAY_MODEL_ADDRESS: model:50052",
     "model address 'model:50052'"),
    ("LLAMA_MODEL_TP: ${LLAMA_GPUS:-1}", "LLAMA_MODEL_TP: 2", "LLAMA_MODEL_TP=2"),
    ("LLAMA_MODEL_GRACE_PERIOD: ${LLAMA_GRACE_PERIOD:-300}", "LLAMA_MODEL_GRACE_PERIOD: 900",
     "< LLAMA_MODEL_GRACE_PERIOD 900"),
], ids=["healthcheck-not-grpc", "started-not-healthy", "address-pinned", "gpus-vs-tp", "grace"])
def test_consistency_checks_bite(tmp_path: Path, old: str, new: str, expected: str) -> None:
    deploy = broken(tmp_path, "docker-compose.yml", old, new)
    problems = compose_problems(config(deploy, "gpu"))
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("    secrets: [ca.crt, model.crt, model.key, upstream-tokens]", "    secrets: [ca.crt, model.crt, model.key]",
     "model: LLAMA_MODEL_AUTH_TOKEN_FILE=/run/secrets/upstream-tokens is not one of its secrets"),
    ("      LLAMA_MODEL_TLS_CLIENT_CA: /run/secrets/ca.crt\n", "", "a client certificate for model"),
    ("      LLAMA_GATEWAY_UPSTREAM_TLS_CA: /run/secrets/ca.crt\n", "", "the other plaintext to tokenizer"),
    ("LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE: /run/secrets/upstream-tokens",
     "LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE: /run/secrets/gateway-tokens", "presents the token in secret gateway-tokens"),
], ids=["token-not-mounted", "no-client-ca", "plaintext-upstream", "wrong-token"])
def test_tls_consistency_checks_bite(tmp_path: Path, old: str, new: str, expected: str) -> None:
    deploy = broken(tmp_path, "docker-compose.tls.yml", old, new)
    problems = compose_problems(config(deploy, "cpu-tls"))
    assert any(expected in problem for problem in problems), problems

"""deploy/k8s: every overlay renders with kustomize, validates strictly against Kubernetes' schemas, and
keeps the rules the schemas cannot see; each check is also run on a copy broken on purpose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import (
    KUBERNETES_VERSIONS,
    REPO,
    copy_repo_files,
    k8s_problems,
    kustomize,
    overlay_with_components,
    render,
    settings_problems,
    validate,
)

K8S = REPO / "deploy" / "k8s"
# (name, overlay, components): the two shipped overlays and the optional components on top of them.
VARIANTS = [
    ("cpu-demo", "cpu-demo", []),
    ("gpu", "gpu", []),
    ("gpu-tls", "gpu", ["tls"]),
    ("gpu-weights-hostpath", "gpu", ["weights-hostpath"]),
    ("cpu-demo-tls", "cpu-demo", ["tls"]),
]


def variant_dir(k8s: Path, name: str, overlay: str, components: list[str]) -> Path:
    if not components:
        return k8s / "overlays" / overlay
    return overlay_with_components(k8s, f"check-{name}", overlay, components)


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s to add the component overlays to (the repository stays untouched)."""
    return copy_repo_files(tmp_path_factory.mktemp("repo")) / "deploy" / "k8s"


@pytest.mark.parametrize(("name", "overlay", "components"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_overlay_renders_and_validates_strictly(k8s_copy: Path, tmp_path: Path, name: str, overlay: str,
                                                components: list[str]) -> None:
    done = kustomize(variant_dir(k8s_copy, name, overlay, components))
    assert done.returncode == 0, done.stderr
    for version in KUBERNETES_VERSIONS:
        checked = validate(done.stdout, tmp_path, version)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert k8s_problems(docs) == []


@pytest.mark.parametrize("overlay", ["cpu-demo", "gpu"])
def test_settings_are_flags_the_servers_read(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    settings = {key: value for doc in docs if doc["kind"] == "ConfigMap" for key, value in doc["data"].items()}
    assert "LLAMA_GATEWAY_MODEL_ADDRESS" in settings
    assert settings_problems(settings) == []


def test_overlays_run_the_images_the_dockerfiles_build() -> None:
    images = {overlay: {c["name"]: c["image"] for doc in render(K8S / "overlays" / overlay)
                        if doc["kind"] == "Deployment" for c in doc["spec"]["template"]["spec"]["containers"]}
              for overlay in ("cpu-demo", "gpu")}
    assert images["cpu-demo"] == dict.fromkeys(("tokenizer", "model", "gateway"), "llama-grpc-demo:0.1.0")
    assert images["gpu"] == {"tokenizer": "llama-grpc-tokenizer:0.1.0", "gateway": "llama-grpc-gateway:0.1.0",
                             "model": "llama-grpc-model-cuda:0.1.0"}


def test_gpu_overlay_weights_come_from_the_volume_not_the_image() -> None:
    docs = render(K8S / "overlays" / "gpu")
    config = next(doc["data"] for doc in docs if doc["kind"] == "ConfigMap")
    assert config["LLAMA_MODEL_CHECKPOINT"].startswith("/models/")
    assert config["LLAMA_TOKENIZER_PATH"] == config["LLAMA_MODEL_CHECKPOINT"]
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in ("llama-model", "llama-tokenizer"):
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True
    assert [doc["metadata"]["name"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"] == ["llama-weights"]


def test_gpu_count_follows_the_tensor_parallel_setting(tmp_path: Path) -> None:
    """One knob: LLAMA_MODEL_TP in gpu.env sets both --tp and the pod's nvidia.com/gpu."""
    k8s = copy_repo_files(tmp_path) / "deploy" / "k8s"
    env_file = k8s / "overlays" / "gpu" / "gpu.env"
    env_file.write_text(re.sub(r"(?m)^LLAMA_MODEL_TP=\d+$", "LLAMA_MODEL_TP=4", env_file.read_text()))
    docs = render(k8s / "overlays" / "gpu")
    model = next(doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "llama-model")
    (container,) = model["spec"]["template"]["spec"]["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "4"
    assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == "4"
    assert k8s_problems(docs) == []


# ---- the same checks on copies broken on purpose -------------------------------------------------

def broken_copy(tmp_path: Path, relative: str, old: str, new: str, count: int = 1) -> Path:
    k8s = copy_repo_files(tmp_path) / "deploy" / "k8s"
    path = k8s / relative
    text = path.read_text()
    assert text.count(old) >= count, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, count))
    return k8s


def test_schema_check_bites_on_a_probe_without_a_port(tmp_path: Path) -> None:
    k8s = broken_copy(tmp_path, "base/model.yaml", "          startupProbe:\n            grpc:\n              port: 50052\n",
                      "          startupProbe:\n            grpc:\n              service: \"\"\n")
    done = kustomize(k8s / "overlays" / "gpu")
    assert done.returncode == 0, done.stderr
    checked = validate(done.stdout, tmp_path, KUBERNETES_VERSIONS[-1])
    assert checked.returncode != 0
    assert "'port' is a required property" in checked.stdout + checked.stderr


def test_schema_check_bites_on_an_unknown_field(tmp_path: Path) -> None:
    k8s = broken_copy(tmp_path, "base/gateway.yaml", "      terminationGracePeriodSeconds: 330",
                      "      terminationGracePeriodSecond: 330")
    checked = validate(kustomize(k8s / "overlays" / "cpu-demo").stdout, tmp_path, KUBERNETES_VERSIONS[0])
    assert checked.returncode != 0  # --strict: a misspelt field is an error, not silently dropped


def test_kustomize_bites_on_a_missing_resource(tmp_path: Path) -> None:
    k8s = broken_copy(tmp_path, "base/kustomization.yaml", "  - model.yaml", "  - models.yaml")
    assert kustomize(k8s / "overlays" / "gpu").returncode != 0


BREAKAGES = {
    "probe on the wrong port": ("base/tokenizer.yaml", "            grpc:\n              port: 50051\n            periodSeconds: 10",
                                "            grpc:\n              port: 50055\n            periodSeconds: 10",
                                "livenessProbe checks port 50055"),
    "container port differs from the setting": ("base/settings.env", "LLAMA_MODEL_PORT=50052", "LLAMA_MODEL_PORT=50053",
                                                "LLAMA_MODEL_PORT=50053"),
    "model Service not headless": ("base/model.yaml", "  clusterIP: None\n", "", "not headless"),
    "gateway pinned to a ClusterIP": ("base/settings.env", "dns:///llama-model-headless:50052",
                                      "llama-model-headless:50052", "is not a dns:/// target"),
    "drain longer than the termination grace": ("base/settings.env", "LLAMA_MODEL_GRACE_PERIOD=300",
                                                "LLAMA_MODEL_GRACE_PERIOD=600", "< LLAMA_MODEL_GRACE_PERIOD 600"),
    "readiness on another server's health": ("base/gateway.yaml", "service: llama.gateway.v1.GatewayService",
                                             "service: llama.model.v1.ModelService", "readiness checks health"),
    "readiness that accepts NOT_SERVING": ("components/tls/gateway-tls.yaml",
                                           '"--name", "llama.gateway.v1.GatewayService"]',
                                           '"--name", "llama.gateway.v1.GatewayService", "--alive"]', "--alive"),
    "service links on": ("base/model.yaml", "enableServiceLinks: false", "enableServiceLinks: true",
                         "enableServiceLinks"),
    "root allowed": ("base/tokenizer.yaml", "runAsNonRoot: true", "runAsNonRoot: false", "may run as root"),
    "disruption budget selects no pods": ("base/model.yaml", "  maxUnavailable: 1\n  selector:\n    matchLabels:\n"
                                          "      app.kubernetes.io/name: llama-grpc\n      app.kubernetes.io/component: model",
                                          "  maxUnavailable: 1\n  selector:\n    matchLabels:\n"
                                          "      app.kubernetes.io/name: llama-grpc\n      app.kubernetes.io/component: modle",
                                          "selects [], not one Deployment"),
    "tokenizer open to every pod": ("base/network-policy.yaml", """  ingress:
    - from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: llama-grpc
              app.kubernetes.io/component: gateway
      ports:
        - port: grpc
""", """  ingress:
    - ports:
        - port: grpc
""", "llama-tokenizer: NetworkPolicy llama-tokenizer lets pods other than the gateway reach its gRPC port"),
    "model reachable from another namespace": ("base/network-policy.yaml", """        - podSelector:
            matchLabels:
              app.kubernetes.io/name: llama-grpc
              app.kubernetes.io/component: gateway
      ports:
        - port: grpc
    - from:
        - namespaceSelector: {}
      ports:
        - port: metrics
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: llama-gateway""", """        - podSelector:
            matchLabels:
              app.kubernetes.io/name: llama-grpc
              app.kubernetes.io/component: gateway
          namespaceSelector: {}
      ports:
        - port: grpc
    - from:
        - namespaceSelector: {}
      ports:
        - port: metrics
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: llama-gateway""", "llama-model: NetworkPolicy llama-model lets pods other than the gateway"),
    "metrics on the client-facing Service": ("base/gateway.yaml", """      targetPort: grpc
# Metrics stay off""", """      targetPort: grpc
    - name: metrics
      port: 9090
      targetPort: metrics
# Metrics stay off""", "exposes ['grpc', 'metrics']"),
    "upstream without a client certificate requirement": ("components/tls/kustomization.yaml",
                                                          "      - LLAMA_MODEL_TLS_CLIENT_CA=/etc/llama-grpc/tls/ca.crt\n",
                                                          "", "where llama-model requires one"),
    "gateway dials an upstream in plaintext": ("components/tls/kustomization.yaml",
                                               "      - LLAMA_GATEWAY_UPSTREAM_TLS_CA=/etc/llama-grpc/upstream-tls/ca.crt\n",
                                               "", "one side speaks TLS, the other plaintext"),
    "gateway presents the wrong token": ("components/tls/kustomization.yaml",
                                         "LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE=/etc/llama-grpc/tokens/upstream-tokens",
                                         "LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE=/etc/llama-grpc/tokens/gateway-tokens",
                                         "presents the token in ('llama-grpc-tokens', 'gateway-tokens')"),
    "token file not mounted": ("components/tls/upstream-tls.yaml", "    mountPath: /etc/llama-grpc/tokens\n",
                               "    mountPath: /etc/llama-grpc/token\n",
                               "LLAMA_TOKENIZER_AUTH_TOKEN_FILE=/etc/llama-grpc/tokens/upstream-tokens is in no Secret"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_consistency_checks_bite(tmp_path: Path, breakage: str) -> None:
    relative, old, new, expected = BREAKAGES[breakage]
    k8s = broken_copy(tmp_path, relative, old, new)
    components = ["tls"] if relative.startswith("components/tls") else []
    problems = k8s_problems(render(variant_dir(k8s, "broken", "gpu", components)))
    assert any(expected in problem for problem in problems), problems


def test_tls_variant_secures_every_hop(tmp_path: Path) -> None:
    """With components/tls every server serves TLS from a Secret, tokenizer and model require client
    certificates and tokens, and the gateway dials them with its own certificate and their token."""
    k8s = overlay_with_components(copy_repo_files(tmp_path) / "deploy" / "k8s", "tls", "cpu-demo",
                                  ["tls"])
    docs = render(k8s)
    assert k8s_problems(docs) == []
    config = next(doc["data"] for doc in docs if doc["kind"] == "ConfigMap")
    for service in ("TOKENIZER", "MODEL", "GATEWAY"):
        assert config[f"LLAMA_{service}_TLS_CERT"] and config[f"LLAMA_{service}_AUTH_TOKEN_FILE"]
    for service in ("TOKENIZER", "MODEL"):
        assert config[f"LLAMA_{service}_TLS_CLIENT_CA"]
    for setting in ("UPSTREAM_TLS_CA", "UPSTREAM_TLS_CERT", "UPSTREAM_TLS_KEY", "UPSTREAM_AUTH_TOKEN_FILE"):
        assert config[f"LLAMA_GATEWAY_{setting}"]
    assert settings_problems(config) == []  # every variable is a flag the servers read
    secrets = {volume["secret"]["secretName"] for doc in docs if doc["kind"] == "Deployment"
               for volume in doc["spec"]["template"]["spec"]["volumes"] if "secret" in volume}
    assert secrets == {"llama-grpc-tls", "llama-grpc-tokenizer-tls", "llama-grpc-model-tls",
                       "llama-grpc-gateway-client-tls", "llama-grpc-tokens"}


def test_consistency_check_bites_when_gpus_and_tp_are_set_apart(tmp_path: Path) -> None:
    """Without the replacement that ties them, --tp 2 would run on a pod given no GPU."""
    k8s = copy_repo_files(tmp_path) / "deploy" / "k8s"
    overlay = k8s / "overlays" / "gpu"
    kustomization = overlay / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().split("# One knob")[0])
    env_file = overlay / "gpu.env"
    env_file.write_text(re.sub(r"(?m)^LLAMA_MODEL_TP=\d+$", "LLAMA_MODEL_TP=2", env_file.read_text()))
    problems = k8s_problems(render(overlay))
    assert "llama-model/model: nvidia.com/gpu limit None but LLAMA_MODEL_TP=2" in problems


@pytest.mark.parametrize(("settings", "expected"), [
    ({"LLAMA_MODEL_MAX_BATCH": "4"}, "LLAMA_MODEL_MAX_BATCH: no server reads it"),
    ({"LLAMA_MODEL_DEVICE": "gpu"}, "LLAMA_MODEL_DEVICE=gpu: not one of cpu, cuda"),
    ({"LLAMA_MODEL_TP": "two"}, "model_service refuses its settings"),
    ({"LLAMA_GATEWAY_GRACE_PERIOD": "5m"}, "gateway refuses its settings"),
], ids=["misspelt", "not-a-choice", "not-an-int", "not-a-number"])
def test_settings_check_bites(settings: dict[str, str], expected: str) -> None:
    problems = settings_problems(settings)
    assert any(expected in problem for problem in problems), problems

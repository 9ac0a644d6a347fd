"""The offline checks of deploy/: the real tools (kubectl kustomize, kubernetes-validate, docker compose,
hadolint) plus the cross-file rules no schema knows (ports, probes, GPUs, flags), as problem lists.

Each check takes a directory, so a test can run it on the repository or on a copy broken on purpose.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest still common with GA gRPC probes; newest known
SERVICES = {"tokenizer": "tokenizer_service", "model": "model_service", "gateway": "gateway"}
DEFAULT_PORTS = {"tokenizer": 50051, "model": 50052, "gateway": 50050}


def tool(name: str) -> str:
    """A command-line tool from the venv (pyproject's test extras) or the machine (kubectl)."""
    for candidate in (BIN / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} not found: `make install kubectl` installs it")


def run(*command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def copy_repo_files(tmp_path: Path) -> Path:
    """deploy/ and the root files it reads, copied so a test can break them."""
    for name in ("pyproject.toml", "Makefile", ".dockerignore"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    return tmp_path


# ---- Kubernetes ------------------------------------------------------------------------------------

def kustomize(directory: Path) -> subprocess.CompletedProcess:
    return run(tool("kubectl"), "kustomize", str(directory))


def render(directory: Path) -> list[dict[str, Any]]:
    done = kustomize(directory)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate(manifests: str, tmp_path: Path, version: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"rendered-{version}.yaml"
    path.write_text(manifests)
    return run(tool("kubernetes-validate"), "--strict", "--quiet", "--kubernetes-version", version, str(path))


def overlay_with_components(k8s: Path, name: str, base_overlay: str, components: list[str]) -> Path:
    """A throwaway overlay = an overlay plus optional components, the way an operator adds them."""
    directory = k8s / "overlays" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"../{base_overlay}"],
        "components": [f"../../components/{component}" for component in components],
    }))
    return directory


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _settings(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    config_maps = _by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return env


def _probe_problems(where: str, kind: str, probe: dict[str, Any] | None, service: str,
                    grpc_port: int | None) -> list[str]:
    if probe is None:
        return [f"{where}: no {kind}"]
    if "grpc" in probe:
        if probe["grpc"].get("port") != grpc_port:
            return [f"{where}: {kind} checks port {probe['grpc'].get('port')}, the gRPC port is {grpc_port}"]
        return []
    # An exec probe (TLS) runs the image's health check, which finds the port in LLAMA_<SERVICE>_PORT.
    command = probe.get("exec", {}).get("command", [])
    if command[:5] != ["python", "-m", "llama_grpc_runtime.healthcheck", "--service", service]:
        return [f"{where}: {kind} is neither a grpc probe nor the image's health check of {service}: {probe}"]
    if kind == "readinessProbe" and "--alive" in command:
        return [f"{where}: readiness accepts NOT_SERVING (--alive): calls would reach a server that refuses them"]
    return []


def _grpc_service_names() -> set[str]:
    from llama_grpc_stubs.gateway.v1 import gateway_pb2
    from llama_grpc_stubs.model.v1 import model_pb2
    from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2
    return {service.full_name for module in (tokenizer_pb2, model_pb2, gateway_pb2)
            for service in module.DESCRIPTOR.services_by_name.values()}


def k8s_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What `kubernetes-validate` cannot see: the resources agreeing with each other and with the code."""
    problems: list[str] = []
    deployments = _by_kind(docs, "Deployment")
    services = _by_kind(docs, "Service")
    claims = _by_kind(docs, "PersistentVolumeClaim")
    if set(deployments) != {f"llama-{name}" for name in SERVICES}:
        problems.append(f"expected the three Deployments, found {sorted(deployments)}")
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        settings = _settings(docs, deployment)
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{name}: pod may run as root")
        if pod.get("enableServiceLinks", True):
            # A Service named llama-model would inject LLAMA_MODEL_PORT=tcp://...: the flag's env twin.
            problems.append(f"{name}: enableServiceLinks lets Service variables clash with LLAMA_* settings")
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims:
                problems.append(f"{name}: volume {volume['name']} claims {claim}, which is not rendered")
        for container in pod["containers"]:
            service = container["name"]
            where = f"{name}/{service}"
            if service not in SERVICES:
                problems.append(f"{where}: container name is not one of {sorted(SERVICES)}")
                continue
            prefix = f"LLAMA_{service.upper()}"
            if container.get("command") != ["python", "-m", SERVICES[service]]:
                problems.append(f"{where}: command {container.get('command')} does not start {SERVICES[service]}")
            ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
            grpc_port = ports.get("grpc")
            if str(grpc_port) != settings.get(f"{prefix}_PORT", str(DEFAULT_PORTS[service])):
                problems.append(f"{where}: containerPort grpc {grpc_port} but {prefix}_PORT="
                                f"{settings.get(f'{prefix}_PORT')}")
            if str(ports.get("metrics")) != settings.get(f"{prefix}_METRICS_PORT"):
                problems.append(f"{where}: containerPort metrics {ports.get('metrics')} but {prefix}_METRICS_PORT="
                                f"{settings.get(f'{prefix}_METRICS_PORT')}")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                problems += _probe_problems(where, kind, container.get(kind), service, grpc_port)
            readiness = container.get("readinessProbe") or {}
            checked = readiness.get("grpc", {}).get("service")
            if "exec" in readiness:
                command = readiness["exec"]["command"]
                checked = command[command.index("--name") + 1] if "--name" in command else None
            if checked not in _grpc_service_names() or f".{service}." not in checked:
                problems.append(f"{where}: readiness checks health of {checked!r}, not this server's service")
            grace = float(settings.get(f"{prefix}_GRACE_PERIOD", 30))
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
            if pod.get("terminationGracePeriodSeconds", 30) < grace + pause:
                problems.append(f"{where}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')}"
                                f" < {prefix}_GRACE_PERIOD {grace} + preStop {pause}")
            security = container.get("securityContext", {})
            if security.get("allowPrivilegeEscalation") is not False or "ALL" not in security.get(
                    "capabilities", {}).get("drop", []):
                problems.append(f"{where}: container keeps privileges")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where}: mounts {mount['name']}, which is not a volume of the pod")
            resources = container.get("resources", {})
            if "cpu" not in resources.get("requests", {}) or "memory" not in resources.get("limits", {}):
                problems.append(f"{where}: needs cpu requests (autoscaling) and memory limits")
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if service == "model":
                tp = settings.get("LLAMA_MODEL_TP", "1")
                on_gpu = settings.get("LLAMA_MODEL_DEVICE") == "cuda"
                if on_gpu and str(gpus) != tp:
                    problems.append(f"{where}: nvidia.com/gpu limit {gpus} but LLAMA_MODEL_TP={tp}")
                if gpus is not None and not on_gpu:
                    problems.append(f"{where}: has GPUs but LLAMA_MODEL_DEVICE={settings.get('LLAMA_MODEL_DEVICE')}")
            elif gpus is not None:
                problems.append(f"{where}: only the model service uses GPUs")
            problems += _file_setting_problems(where, prefix, settings, container, volumes)
            if settings.get(f"{prefix}_TLS_CERT"):
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if "grpc" in (container.get(kind) or {}):
                        problems.append(f"{where}: {kind} is a plaintext grpc probe but the server speaks TLS")
        if "gateway" in name:
            for upstream in ("tokenizer", "model"):
                problems += _upstream_problems(name, settings, upstream, services, deployments)
                if f"llama-{upstream}" in deployments:
                    problems += _upstream_security_problems(docs, deployment, deployments[f"llama-{upstream}"], upstream)
    problems += _autoscaling_problems(docs, deployments)
    problems += _network_problems(docs, deployments, services)
    return problems


# Settings that name a file the server reads (certificates, keys, token lists).
_FILE_SETTING = re.compile(r"_(TLS_CERT|TLS_KEY|TLS_CLIENT_CA|UPSTREAM_TLS_CA|UPSTREAM_TLS_CERT|UPSTREAM_TLS_KEY|"
                           r"AUTH_TOKEN_FILE|UPSTREAM_AUTH_TOKEN_FILE)$")


def _secret_file(container: dict[str, Any], volumes: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file at ``path`` in ``container``, or None when no Secret provides it."""
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(directory):
            continue
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None:
            return None
        name = path[len(directory):]
        items = secret.get("items")
        if items is not None:
            keys = {item["path"]: item["key"] for item in items}
            return (secret["secretName"], keys[name]) if name in keys else None
        return secret["secretName"], name
    return None


def _file_setting_problems(where: str, prefix: str, settings: dict[str, str], container: dict[str, Any],
                           volumes: dict[str, Any]) -> list[str]:
    problems = []
    for variable, path in settings.items():
        if variable.startswith(prefix + "_") and _FILE_SETTING.search(variable) and path:
            if _secret_file(container, volumes, path) is None:
                problems.append(f"{where}: {variable}={path} is in no Secret mounted into the container")
    return problems


def _upstream_security_problems(docs: list[dict[str, Any]], gateway: dict[str, Any], upstream: dict[str, Any],
                                service: str) -> list[str]:
    """The gateway speaks to an upstream the way the upstream expects: TLS with TLS, a client
    certificate where one is required, the token the upstream accepts."""
    gateway_env, upstream_env = _settings(docs, gateway), _settings(docs, upstream)
    prefix, name = f"LLAMA_{service.upper()}", upstream["metadata"]["name"]
    problems = []
    if bool(upstream_env.get(f"{prefix}_TLS_CERT")) != bool(gateway_env.get("LLAMA_GATEWAY_UPSTREAM_TLS_CA")):
        problems.append(f"llama-gateway: LLAMA_GATEWAY_UPSTREAM_TLS_CA={gateway_env.get('LLAMA_GATEWAY_UPSTREAM_TLS_CA')}"
                        f" but {name} {prefix}_TLS_CERT={upstream_env.get(f'{prefix}_TLS_CERT')}: one side "
                        "speaks TLS, the other plaintext")
    if bool(upstream_env.get(f"{prefix}_TLS_CLIENT_CA")) != bool(gateway_env.get("LLAMA_GATEWAY_UPSTREAM_TLS_CERT")):
        problems.append(f"llama-gateway: presents a client certificate "
                        f"({gateway_env.get('LLAMA_GATEWAY_UPSTREAM_TLS_CERT')}) where {name} requires one "
                        f"({prefix}_TLS_CLIENT_CA={upstream_env.get(f'{prefix}_TLS_CLIENT_CA')}): they must go together")
    accepted_path = upstream_env.get(f"{prefix}_AUTH_TOKEN_FILE")
    presented_path = gateway_env.get("LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE")
    if bool(accepted_path) != bool(presented_path):
        problems.append(f"llama-gateway: LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE={presented_path} but {name} "
                        f"{prefix}_AUTH_TOKEN_FILE={accepted_path}: a token is required and not sent, or sent to no one")
    elif accepted_path:
        pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in (gateway, upstream)}
        presented = _secret_file(pods["llama-gateway"]["containers"][0], {v["name"]: v for v in pods[
            "llama-gateway"].get("volumes", [])}, presented_path)
        accepted = _secret_file(pods[name]["containers"][0], {v["name"]: v for v in pods[name].get("volumes", [])},
                                accepted_path)
        if presented != accepted:
            problems.append(f"llama-gateway: presents the token in {presented} but {name} accepts those in {accepted}")
    return problems


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _network_problems(docs: list[dict[str, Any]], deployments: dict[str, Any], services: dict[str, Any]) -> list[str]:
    """Only gateway pods reach tokenizer and model gRPC; metrics stay off the client-facing Service."""
    problems = []
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    gateway_labels = deployments.get("llama-gateway", {}).get("spec", {}).get("template", {}).get(
        "metadata", {}).get("labels", {})
    for upstream in ("llama-tokenizer", "llama-model"):
        if upstream not in deployments:
            continue
        labels = deployments[upstream]["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)
                     and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not selecting:
            problems.append(f"{upstream}: no NetworkPolicy selects its pods: anyone may call it")
            continue
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                ports = [port.get("port") for port in rule.get("ports", [])]
                if ports and "grpc" not in ports and 50051 not in ports and 50052 not in ports:
                    continue
                peers = rule.get("from")
                if not peers or any("podSelector" not in peer or "namespaceSelector" in peer
                                    or not _selects(peer["podSelector"], gateway_labels)
                                    or not peer["podSelector"].get("matchLabels") for peer in peers):
                    problems.append(f"{upstream}: NetworkPolicy {policy['metadata']['name']} lets pods other than "
                                    f"the gateway reach its gRPC port: {rule}")
    client_facing = services.get("llama-gateway")
    if client_facing:
        exposed = [port.get("name") for port in client_facing["spec"]["ports"]]
        if exposed != ["grpc"]:
            problems.append(f"llama-gateway Service (client-facing) exposes {exposed}, not only grpc (metrics must "
                            "not be reachable through it)")
    return problems


def _upstream_problems(name: str, settings: dict[str, str], upstream: str, services: dict[str, Any],
                       deployments: dict[str, Any]) -> list[str]:
    variable = f"LLAMA_GATEWAY_{upstream.upper()}_ADDRESS"
    address = settings.get(variable, "")
    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", address)
    if not match:
        return [f"{name}: {variable}={address!r} is not a dns:/// target the gateway re-resolves"]
    service = services.get(match.group(1))
    if service is None:
        return [f"{name}: {variable} names Service {match.group(1)}, which is not rendered"]
    problems = []
    if service["spec"].get("clusterIP") != "None":
        problems.append(f"{name}: {variable} names {match.group(1)}, which is not headless: one connection "
                        f"would pin every call to one pod")
    if int(match.group(2)) not in [port["port"] for port in service["spec"]["ports"]]:
        problems.append(f"{name}: {variable} port {match.group(2)} is not a port of {match.group(1)}")
    target = deployments.get(f"llama-{upstream}")
    labels = target["spec"]["template"]["metadata"]["labels"] if target else {}
    if not target or any(labels.get(k) != v for k, v in service["spec"]["selector"].items()):
        problems.append(f"{name}: {match.group(1)} does not select the {upstream} pods")
    return problems


def _autoscaling_problems(docs: list[dict[str, Any]], deployments: dict[str, Any]) -> list[str]:
    problems = []
    autoscaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in _by_kind(docs, "HorizontalPodAutoscaler").values()}
    if autoscaled != {"llama-tokenizer", "llama-gateway"}:
        problems.append(f"HorizontalPodAutoscalers should scale tokenizer and gateway, they scale {sorted(autoscaled)}")
    for name, budget in _by_kind(docs, "PodDisruptionBudget").items():
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [d for d, deployment in deployments.items()
                   if all(deployment["spec"]["template"]["metadata"]["labels"].get(k) == v
                          for k, v in selector.items())]
        if len(matched) != 1:
            problems.append(f"PodDisruptionBudget {name} selects {matched}, not one Deployment")
    budgeted = {budget["metadata"]["name"] for budget in _by_kind(docs, "PodDisruptionBudget").values()}
    if budgeted != set(deployments):
        problems.append(f"PodDisruptionBudgets {sorted(budgeted)} do not cover {sorted(deployments)}")
    return problems


# ---- Flags ---------------------------------------------------------------------------------------

def _server_help(module: str, settings: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m MODULE --help` with only these LLAMA_* variables: the servers convert env values
    while building their parser, so a bad value fails even here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "COLUMNS": "100000", **(settings or {})}, timeout=120)


@functools.cache
def service_env_variables() -> dict[str, tuple[str, ...] | None]:
    """Every LLAMA_* variable the three servers read, as their own `--help` lists them, with the
    values it may take when the flag has choices (argparse does not check defaults against them)."""
    variables: dict[str, tuple[str, ...] | None] = {}
    for module in SERVICES.values():
        done = _server_help(module)
        assert done.returncode == 0, done.stderr
        for line in done.stdout.splitlines():
            if match := re.search(r"\[env: (LLAMA_[A-Z0-9_]+)\]", line):
                choices = re.match(r"\s*--[\w-]+ \{([^}]*)\}", line)
                variables[match.group(1)] = tuple(choices.group(1).split(",")) if choices else None
    from llama_grpc_runtime import healthcheck  # the health check reads a few of its own
    variables |= dict.fromkeys(re.findall(r"LLAMA_HEALTHCHECK_[A-Z_]+", Path(healthcheck.__file__).read_text()))
    return variables


def unknown_variables(variables: set[str]) -> list[str]:
    known = service_env_variables()
    return sorted(name for name in variables if name.startswith("LLAMA_") and name not in known
                  and name != "LLAMA_GRPC_CACHE")


def settings_problems(settings: dict[str, str]) -> list[str]:
    """Names the servers do not read, values outside a flag's choices, values a server rejects."""
    problems = [f"{name}: no server reads it" for name in unknown_variables(set(settings))]
    for name, value in settings.items():
        choices = service_env_variables().get(name)
        if choices and value not in choices:
            problems.append(f"{name}={value}: not one of {', '.join(choices)}")
    for service, module in SERVICES.items():
        own = {k: v for k, v in settings.items() if k.startswith(f"LLAMA_{service.upper()}_")}
        if not own:
            continue
        done = _server_help(module, own)
        if done.returncode != 0:
            problems.append(f"{module} refuses its settings: {done.stderr.strip().splitlines()[-1]}")
    return problems


# ---- Compose -------------------------------------------------------------------------------------

def compose_config(deploy: Path, *files: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [arg for name in files for arg in ("-f", str(deploy / name))]
    return run(tool("docker-compose"), *args, "config", "--format", "json", env=env)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(value) * units[unit] for value, unit in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def compose_problems(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services = config["services"]
    if set(services) != set(SERVICES):
        return [f"expected services {sorted(SERVICES)}, found {sorted(services)}"]
    for name, service in services.items():
        env = service.get("environment", {})
        prefix = f"LLAMA_{name.upper()}"
        test = service.get("healthcheck", {}).get("test", [])
        if test[:5] != ["CMD", "python", "-m", "llama_grpc_runtime.healthcheck", "--service"] or test[5:6] != [name]:
            problems.append(f"{name}: healthcheck {test} does not check this service over gRPC health")
        grace = float(env.get(f"{prefix}_GRACE_PERIOD", 30))
        if _seconds(service.get("stop_grace_period", "10s")) < grace:
            problems.append(f"{name}: stop_grace_period {service.get('stop_grace_period')} < {prefix}_GRACE_PERIOD {grace}")
        if service.get("stop_signal", "SIGTERM") != "SIGTERM":
            problems.append(f"{name}: stop_signal is not SIGTERM")
        command = service.get("command")
        if command is not None and command != ["python", "-m", SERVICES[name]]:
            problems.append(f"{name}: command {command} does not start {SERVICES[name]}")
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] != "service_healthy":
                problems.append(f"{name}: waits for {dependency} to be {condition['condition']}, not healthy")
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [device for device in devices if "gpu" in device.get("capabilities", [])]
        if name == "model":
            on_gpu = env.get("LLAMA_MODEL_DEVICE") == "cuda"
            if on_gpu and [str(device.get("count")) for device in gpus] != [env.get("LLAMA_MODEL_TP", "1")]:
                problems.append(f"model: reserves {gpus} GPUs but LLAMA_MODEL_TP={env.get('LLAMA_MODEL_TP')}")
            if gpus and not on_gpu:
                problems.append("model: reserves a GPU but LLAMA_MODEL_DEVICE is not cuda")
        elif gpus:
            problems.append(f"{name}: only the model service uses GPUs")
    gateway = services["gateway"]
    for upstream in ("tokenizer", "model"):
        if gateway.get("depends_on", {}).get(upstream, {}).get("condition") != "service_healthy":
            problems.append(f"gateway: does not wait for {upstream} to be healthy")
        address = gateway.get("environment", {}).get(f"LLAMA_GATEWAY_{upstream.upper()}_ADDRESS", "")
        port = services[upstream].get("environment", {}).get(f"LLAMA_{upstream.upper()}_PORT",
                                                               str(DEFAULT_PORTS[upstream]))
        if address != f"dns:///{upstream}:{port}":
            problems.append(f"gateway: {upstream} address {address!r} is not dns:///{upstream}:{port}")
    return problems + _compose_security_problems(services)


def _compose_security_problems(services: dict[str, Any]) -> list[str]:
    """Files the servers read come from the service's secrets; the gateway dials each upstream the
    way the upstream expects (TLS, client certificate, the token it accepts)."""
    problems = []
    sources: dict[str, dict[str, str]] = {}  # service -> path in the container -> secret name
    for name, service in services.items():
        sources[name] = {secret.get("target", f"/run/secrets/{secret['source']}"): secret["source"]
                         for secret in service.get("secrets", [])}
        for variable, path in service.get("environment", {}).items():
            if _FILE_SETTING.search(variable) and path and path not in sources[name]:
                problems.append(f"{name}: {variable}={path} is not one of its secrets")
    gateway = services["gateway"].get("environment", {})
    for upstream in ("tokenizer", "model"):
        env, prefix = services[upstream].get("environment", {}), f"LLAMA_{upstream.upper()}"
        if bool(env.get(f"{prefix}_TLS_CERT")) != bool(gateway.get("LLAMA_GATEWAY_UPSTREAM_TLS_CA")):
            problems.append(f"gateway: one side speaks TLS, the other plaintext to {upstream}")
        if bool(env.get(f"{prefix}_TLS_CLIENT_CA")) != bool(gateway.get("LLAMA_GATEWAY_UPSTREAM_TLS_CERT")):
            problems.append(f"gateway: a client certificate for {upstream} is required and not presented, or the reverse")
        accepted = sources[upstream].get(env.get(f"{prefix}_AUTH_TOKEN_FILE", ""))
        presented = sources["gateway"].get(gateway.get("LLAMA_GATEWAY_UPSTREAM_AUTH_TOKEN_FILE", ""))
        if accepted != presented:
            problems.append(f"gateway: presents the token in secret {presented} but {upstream} accepts those in {accepted}")
    return problems


# ---- Dockerfiles ---------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def dockerfile_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions, each stage's inherited from the stage it is built FROM."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for index, (keyword, rest) in enumerate(dockerfile_instructions(path)):
        if keyword == "FROM":
            words = rest.split()
            parent = stages.get(words[0], [])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else f"stage{index}"
            current = stages[name] = [*parent, (keyword, rest)]
        elif current is not None:
            current.append((keyword, rest))
    return stages


def makefile_variable(name: str, makefile: Path = REPO / "Makefile") -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", makefile.read_text(), re.MULTILINE)
    assert match, f"{name} not in {makefile}"
    return match.group(1)

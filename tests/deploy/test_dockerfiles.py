"""deploy/docker: hadolint passes on every Dockerfile, the images install the project the way CI does
(pyproject.toml, the Makefile's torch pin), and every runnable target is non-root with a gRPC health
check of the server it starts. Each check is also run on a broken copy."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.tools import (
    DEFAULT_PORTS,
    REPO,
    SERVICES,
    copy_repo_files,
    dockerfile_instructions,
    dockerfile_stages,
    makefile_variable,
    run,
    tool,
)

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
# Runnable targets -> the server their default command starts ("stack": all three, gateway health).
TARGETS = {("Dockerfile", "tokenizer"): "tokenizer", ("Dockerfile", "gateway"): "gateway",
           ("Dockerfile", "model-cpu"): "model", ("Dockerfile", "demo"): "stack",
           ("Dockerfile.cuda", None): "model"}


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return run(tool("hadolint"), "--no-color", str(path))


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_hadolint_passes(path: Path) -> None:
    done = hadolint(path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("appended", "rule"), [
    ("FROM python:latest AS extra\n", "DL3007"),  # unpinned base image
    ("USER root\n", "DL3002"),  # the image would run as root
    ("RUN pip install --no-cache-dir requests\n", "DL3013"),  # an unpinned dependency
])
def test_hadolint_bites(tmp_path: Path, appended: str, rule: str) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text((DOCKER / "Dockerfile").read_text() + appended)
    done = hadolint(broken)
    assert done.returncode != 0
    assert rule in done.stdout


# ---- the install steps are the project's own -----------------------------------------------------

def pip_installs(path: Path) -> list[str]:
    return [rest for keyword, rest in dockerfile_instructions(path) if keyword == "RUN" and "pip install" in rest]


def install_problems(path: Path, makefile: Path, pyproject: Path) -> list[str]:
    """The image's pip installs are: torch at the Makefile's pin, pyproject's dependencies, `pip install .`."""
    problems = []
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for keyword, rest in dockerfile_instructions(path)
            if keyword == "ARG" and "=" in rest}
    torch_spec = makefile_variable("TORCH_SPEC", makefile)
    if path.name == "Dockerfile":
        if args.get("TORCH_SPEC") != torch_spec:
            problems.append(f"{path.name}: TORCH_SPEC {args.get('TORCH_SPEC')} but the Makefile installs {torch_spec}")
    else:  # the CUDA image keeps its base image's torch, which must be the Makefile's version
        tag = next(rest for keyword, rest in dockerfile_instructions(path) if keyword == "FROM")
        if f"torch=={args.get('TORCH_VERSION')}" != torch_spec or "${TORCH_VERSION}" not in tag:
            problems.append(f"{path.name}: base image torch {args.get('TORCH_VERSION')} but the Makefile installs {torch_spec}")
    # Every later pip call is constrained to that torch, so nothing swaps it for another build.
    held = '"${TORCH_SPEC}"' if path.name == "Dockerfile" else '"torch==${TORCH_VERSION}"'
    env = " ".join(rest for keyword, rest in dockerfile_instructions(path) if keyword == "ENV")
    constraint = re.search(r"PIP_CONSTRAINT=(\S+)", env)
    if not constraint or not any(f"echo {held} > {constraint.group(1)}" in rest
                                 for keyword, rest in dockerfile_instructions(path) if keyword == "RUN"):
        problems.append(f"{path.name}: torch is not held at its pinned version while installing")
    allowed = [
        re.compile(r'pip install --no-cache-dir --index-url "\$\{TORCH_INDEX_URL\}" "\$\{TORCH_SPEC\}"( &&|$)'),
        re.compile(r"python /tmp/pyproject_requirements\.py pyproject\.toml > /tmp/requirements\.txt "
                   r"&& pip install --no-cache-dir -r /tmp/requirements\.txt$"),
        re.compile(r"pip install --no-cache-dir \. (&& .*)?$"),
    ]
    installs = pip_installs(path)
    for command in installs:
        if not any(pattern.match(command) for pattern in allowed):
            problems.append(f"{path.name}: `{command}` is not one of the project's own install steps")
    if not any(allowed[2].match(command) for command in installs):
        problems.append(f"{path.name}: never runs `pip install .` of the project")
    # `pip install .` builds what pyproject's package finder includes: those directories must be copied.
    copied = {rest.split()[0].rstrip("/") for keyword, rest in dockerfile_instructions(path)
              if keyword == "COPY" and not rest.startswith("--from")}
    config = tomllib.loads(pyproject.read_text())
    needed = {pattern.rstrip("*") for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"protos" if (REPO / "protos" / name).is_dir() else name for name in needed} | {"pyproject.toml", config["project"]["readme"]}
    if missing := needed - copied:
        problems.append(f"{path.name}: `pip install .` needs {sorted(missing)}, which are not copied")
    return problems


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_images_install_the_project_as_ci_does(path: Path) -> None:
    assert install_problems(path, REPO / "Makefile", REPO / "pyproject.toml") == []


def test_dependency_layer_installs_exactly_pyprojects_dependencies() -> None:
    done = subprocess.run([sys.executable, str(DOCKER / "pyproject_requirements.py"), str(REPO / "pyproject.toml")],
                          capture_output=True, text=True, check=True)
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert done.stdout.splitlines() == expected
    assert any(line.startswith("torch") for line in expected)


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("Makefile", "TORCH_SPEC ?= torch==2.13.0", "TORCH_SPEC ?= torch==2.14.0", "but the Makefile installs"),
    ("deploy/docker/Dockerfile", "    && pip install --no-cache-dir -r /tmp/requirements.txt",
     "    && pip install --no-cache-dir -r /tmp/requirements.txt\nRUN pip install --no-cache-dir numpy==2.0.0",
     "is not one of the project's own install steps"),
    ("deploy/docker/Dockerfile", "COPY gateway/ gateway/\n", "", "['gateway'], which are not copied"),
    ("deploy/docker/Dockerfile.cuda", 'echo "torch==${TORCH_VERSION}"', 'echo "torch"',
     "Dockerfile.cuda: torch is not held at its pinned version"),
    ("deploy/docker/Dockerfile", "ENV PIP_CONSTRAINT=/tmp/torch-constraint.txt\n", "",
     "Dockerfile: torch is not held at its pinned version"),
], ids=["torch-pin-drifts", "extra-pip-install", "package-not-copied", "cuda-torch-unpinned", "cpu-torch-unpinned"])
def test_install_check_bites(tmp_path: Path, file: str, old: str, new: str, expected: str) -> None:
    root = copy_repo_files(tmp_path)
    text = (root / file).read_text()
    assert old in text
    (root / file).write_text(text.replace(old, new, 1))
    problems = [problem for path in sorted((root / "deploy" / "docker").glob("Dockerfile*"))
                for problem in install_problems(path, root / "Makefile", root / "pyproject.toml")]
    assert any(expected in problem for problem in problems), problems


# ---- what each runnable target is ----------------------------------------------------------------

def target_problems(path: Path, target: str | None, server: str) -> list[str]:
    stages = dockerfile_stages(path)
    instructions = stages[target] if target else list(stages.values())[-1]
    where = f"{path.name}:{target or 'final'}"
    last = {keyword: rest for keyword, rest in instructions}  # the last of each kind is what counts
    problems = []
    user = last.get("USER", "0").split(":")[0]
    if not user.isdigit() or int(user) == 0:
        problems.append(f"{where}: runs as {last.get('USER', 'root')}, not a numeric non-root user")
    if last.get("STOPSIGNAL") != "SIGTERM":
        problems.append(f"{where}: STOPSIGNAL is {last.get('STOPSIGNAL')}")
    if '["/models"]' not in [rest for keyword, rest in instructions if keyword == "VOLUME"]:
        problems.append(f"{where}: no VOLUME /models for the weights")
    checked = "gateway" if server == "stack" else server
    healthcheck = last.get("HEALTHCHECK", "")
    if f'CMD ["python", "-m", "llama_grpc_runtime.healthcheck", "--service", "{checked}"]' not in healthcheck:
        problems.append(f"{where}: HEALTHCHECK `{healthcheck}` is not the gRPC health check of {checked}")
    module = "llama_grpc_devtools.stack" if server == "stack" else SERVICES[server]
    if not last.get("CMD", "").startswith(f'["python", "-m", "{module}"'):
        problems.append(f"{where}: CMD {last.get('CMD')} does not start {module}")
    exposed = {int(port) for keyword, rest in instructions if keyword == "EXPOSE" for port in rest.split()}
    if DEFAULT_PORTS[checked] not in exposed:
        problems.append(f"{where}: does not EXPOSE {DEFAULT_PORTS[checked]}")
    return problems


@pytest.mark.parametrize(("file", "target"), list(TARGETS), ids=[f"{f}:{t}" for f, t in TARGETS])
def test_target_is_non_root_with_a_grpc_health_check(file: str, target: str | None) -> None:
    assert target_problems(DOCKER / file, target, TARGETS[(file, target)]) == []


def test_demo_bakes_the_embedded_model_and_other_targets_bake_no_weights() -> None:
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    runs = {name: [rest for keyword, rest in stage if keyword == "RUN"] for name, stage in stages.items()}
    assert any("python -m llama_grpc_runtime.assets" in command for command in runs["demo"])
    env = " ".join(rest for keyword, rest in stages["demo"] if keyword == "ENV")
    assert "LLAMA_GRPC_CACHE=/opt/llama-grpc/assets" in env
    for name in ("tokenizer", "gateway", "model-cpu"):
        assert not any("llama_grpc_runtime.assets" in command for command in runs[name]), name
    cuda = " ".join(rest for keyword, rest in dockerfile_instructions(DOCKER / "Dockerfile.cuda"))
    assert "llama_grpc_runtime.assets" not in cuda


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("USER 10001:10001\n\nFROM runtime AS tokenizer", "USER llama\n\nFROM runtime AS tokenizer", "not a numeric"),
    ('"--service", "tokenizer"]', '"--service", "gateway"]', "not the gRPC health check of tokenizer"),
    ("EXPOSE 50051 9091", "EXPOSE 9091", "does not EXPOSE 50051"),
    ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL", "STOPSIGNAL is SIGKILL"),
])
def test_target_check_bites(tmp_path: Path, old: str, new: str, expected: str) -> None:
    broken = tmp_path / "Dockerfile"
    text = (DOCKER / "Dockerfile").read_text()
    assert old in text
    broken.write_text(text.replace(old, new, 1))
    problems = target_problems(broken, "tokenizer", "tokenizer")
    assert any(expected in problem for problem in problems), problems


# ---- .dockerignore lets in exactly what the COPY lines need --------------------------------------

def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything under it."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(prefix, pattern) or (pattern.startswith("**/") and
               fnmatch.fnmatchcase(prefix.split("/")[-1], pattern[3:])) for prefix in prefixes):
            excluded = not negated
    return excluded


def dockerignore_problems(root: Path) -> list[str]:
    patterns = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    problems = []
    for path in sorted((root / "deploy" / "docker").glob("Dockerfile*")):
        for keyword, rest in dockerfile_instructions(path):
            if keyword == "COPY" and not rest.startswith("--from"):
                source = rest.split()[0].rstrip("/")
                probe = f"{source}/__init__.py" if not Path(source).suffix else source
                if dockerignore_excludes(patterns, probe):
                    problems.append(f"{path.name}: COPY {source} but .dockerignore leaves it out of the context")
    for unwanted in (".venv/bin/python", "node_modules/x", "tests/deploy/test_x.py", ".git/HEAD",
                     "gateway/__pycache__/x.pyc"):
        if not dockerignore_excludes(patterns, unwanted):
            problems.append(f".dockerignore sends {unwanted} to the build context")
    return problems


def test_dockerignore_keeps_the_context_to_what_the_images_copy() -> None:
    assert dockerignore_problems(REPO) == []


def test_dockerignore_check_bites(tmp_path: Path) -> None:
    root = copy_repo_files(tmp_path)
    text = (root / ".dockerignore").read_text()
    (root / ".dockerignore").write_text(text.replace("!model_service/\n", "").replace("**/__pycache__\n**/*.pyc\n", ""))
    problems = dockerignore_problems(root)
    assert any("COPY model_service" in problem for problem in problems), problems
    assert any("__pycache__" in problem for problem in problems), problems

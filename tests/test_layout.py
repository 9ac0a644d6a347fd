"""Where code lives: every module imports, and nothing depends on a top-level ``llama`` package.

Meta's reference code (``pip install -e .`` of the llama3 / llama-models repositories) installs a
package named ``llama``; our generated stubs are ``llama_grpc_stubs`` and our runtime
``llama_grpc_runtime`` so that both can be installed side by side.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_grpc_runtime", "model_files", "tokenizer_service", "model_service", "gateway",
            "llama_grpc_devtools")


def source_modules() -> list[str]:
    """Every module of the project's packages and of the generated stubs, by import name."""
    modules = []
    for root, package in [(REPO, p) for p in PACKAGES] + [(REPO / "protos", "llama_grpc_stubs")]:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_protos_holds_only_the_contract_its_generated_code_and_the_generator() -> None:
    tracked = subprocess.run(["git", "ls-files", "protos"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        path = Path(name).relative_to("protos")
        if path.parts[0] == "llama":
            assert path.suffix == ".proto", name
        elif path.parts[0] == "llama_grpc_stubs":
            assert path.name == "__init__.py" or path.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")), name
        else:
            assert name in ("protos/buf.yaml", "protos/generate.py"), name


@pytest.mark.parametrize("module", source_modules())
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_services_run_beside_another_top_level_llama_package(tmp_path: Path) -> None:
    """A ``llama`` package first on the path (as Meta's editable install puts it) changes nothing."""
    shadow = tmp_path / "llama"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('this is Meta\\'s llama, not llama-grpc')\n")
    code = ("import sys\n"
            "import gateway.servicer, model_service.server, tokenizer_service.servicer, llama_grpc_runtime.server\n"
            "from llama_grpc_stubs.gateway.v1 import gateway_pb2\n"
            "assert gateway_pb2.DESCRIPTOR.package == 'llama.gateway.v1'\n"
            "assert not [m for m in sys.modules if m == 'llama' or m.startswith('llama.')]\n")
    path = os.pathsep.join([str(tmp_path), str(REPO), str(REPO / "protos"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert done.returncode == 0, done.stderr


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source (top level, inside functions,
    under ``if TYPE_CHECKING``): a lazy import hides a cycle from Python, not from a reader."""
    modules = set(source_modules())
    graph: dict[str, set[str]] = {}
    for module in modules:
        root = REPO / "protos" if module.startswith("llama_grpc_stubs") else REPO
        path = root / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {target for target in targets if target in modules and target != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_tokenizer_core_knows_nothing_of_chat_formats() -> None:
    graph = import_graph()
    chat = {m for m in graph if m.startswith("tokenizer_service.") and "chat" in m}
    assert chat and not graph["tokenizer_service.tokenizer"] & chat


def test_no_service_imports_the_developer_tools() -> None:
    graph = import_graph()
    services = [m for m in graph if not m.startswith("llama_grpc_devtools")]
    assert [m for m in services if any(t.startswith("llama_grpc_devtools") for t in graph[m])] == []


def test_architecture_md_names_only_files_that_exist() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text().replace("\\_", "_")
    named = set(re.findall(r"\b((?:[a-z_0-9]+/)+[a-z_0-9]+\.(?:py|proto))\b", text))
    assert len(named) > 20
    assert sorted(path for path in named if not (REPO / path).is_file()) == []


def test_generate_check_passes_on_the_tree_and_catches_an_edited_stub(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos, ignore=shutil.ignore_patterns("__pycache__"))

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(protos / "generate.py"), "--check"], capture_output=True,
                              text=True, timeout=120)

    assert check().returncode == 0
    stub = protos / "llama_grpc_stubs" / "gateway" / "v1" / "gateway_pb2_grpc.py"
    stub.write_text(stub.read_text().replace("from llama_grpc_stubs.gateway.v1", "from llama.gateway.v1"))
    done = check()
    assert done.returncode == 1 and "gateway/v1/gateway_pb2_grpc.py" in done.stderr

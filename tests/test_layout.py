"""Where code lives: every module imports, and nothing depends on a top-level ``llama`` package.

Meta's reference code (``pip install -e .`` of the llama3 / llama-models repositories) installs a
package named ``llama``; our generated stubs are ``llama_grpc_stubs`` and our runtime
``llama_grpc_runtime`` so that both can be installed side by side.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_grpc_runtime", "tokenizer_service", "model_service", "gateway")


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

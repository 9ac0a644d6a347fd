"""Shared fixtures for tests/model_service: tiny random checkpoints, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_grpc_devtools.make_checkpoint import write_checkpoint

TINY_SEED = 7


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same random weights (preset "tiny": GQA, Llama 3.1 scaled RoPE) in every format, stored
    float32 so formats can be compared exactly: hf, meta (1 file), meta2 (2 files), gguf."""
    root = tmp_path_factory.mktemp("tiny")
    common = dict(preset="tiny", seed=TINY_SEED, dtype=torch.float32)
    return {
        "hf": write_checkpoint(root / "hf", "hf", **common),
        "meta": write_checkpoint(root / "meta", "meta", **common),
        "meta2": write_checkpoint(root / "meta2", "meta", shards=2, **common),
        "gguf": write_checkpoint(root / "tiny.gguf", "gguf", **common),
    }

"""Tensor parallelism: two gloo processes give the same logits as one, for Meta and HF checkpoints,
including re-sharding a 1-file Meta checkpoint to tp=2 and a 2-file one to tp=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_grpc_devtools.make_checkpoint import PRESETS
from model_service import distributed
from model_service.build import build, check_runtime
from model_service.model import Batch

FORMATS = ["meta", "meta2", "hf"]
TOL = 1e-5


def scenario(path: Path) -> dict[str, torch.Tensor]:
    """Logits of a prompt, a decode step, and a mixed batch, on whatever group this process is in."""
    loaded = build(path, max_batch_size=3, max_seq_len=64)
    model = loaded.model
    prompt = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(5))
    out = {"prompt": model(Batch(prompt, [0], [0], [11]), all_logits=True)}
    out["decode"] = model(Batch(torch.tensor([17]), [0], [11], [1]))
    out["mixed"] = model(Batch(torch.cat([torch.tensor([3]), prompt[:6]]), [0, 2], [12, 0], [1, 6]), all_logits=True)
    out["tp_size"] = torch.tensor(loaded.info.tp_size)
    out["local_heads"] = torch.tensor(model.layers[0].attention.n_local_heads)
    return out


def _rank_scenarios(rank: int, paths: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [scenario(path) for path in paths]


@pytest.fixture(scope="module")
def tp2_results(tiny_checkpoints: dict[str, Path]) -> list[list[dict[str, torch.Tensor]]]:
    # One launch for every format: starting two rank processes is the slow part.
    return distributed.launch(2, _rank_scenarios, [tiny_checkpoints[f] for f in FORMATS], timeout_s=300)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tp2_equals_tp1(fmt, tiny_checkpoints, tp2_results):
    expected = scenario(tiny_checkpoints[fmt])  # this process: a 1-rank group
    assert expected["tp_size"] == 1
    for rank, results in enumerate(tp2_results):
        got = results[FORMATS.index(fmt)]
        assert got["tp_size"] == 2 and got["local_heads"] == expected["local_heads"] // 2  # really sharded
        for key in ("prompt", "decode", "mixed"):
            assert (got[key] - expected[key]).abs().max().item() <= TOL, f"rank {rank} {key}"


def test_two_file_meta_checkpoint_resharded_to_one_rank_equals_one_file(tiny_checkpoints):
    one_file, two_files = scenario(tiny_checkpoints["meta"]), scenario(tiny_checkpoints["meta2"])
    for key in ("prompt", "decode", "mixed"):
        assert (one_file[key] - two_files[key]).abs().max().item() <= TOL


def test_tp_size_must_divide_heads():
    args = PRESETS["tiny"]  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tensor-parallel size 3 must divide n_heads=4, n_kv_heads=2"):
        check_runtime(args, 3, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        check_runtime(args, 4, torch.float32, torch.device("cpu"))
    check_runtime(args, 2, torch.float32, torch.device("cpu"))


def test_a_failing_rank_reports_its_error():
    with pytest.raises(RuntimeError, match="(?s)rank 0 failed.*does not exist"):
        distributed.launch(1, _rank_scenarios, [Path("/nonexistent/checkpoint")], timeout_s=120)

"""The same code path on CUDA: bfloat16 / float16 caches and weights on the GPU, checked against the
float32 CPU model; tp=2 over NCCL when two GPUs are present. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_service import distributed
from model_service.build import build
from model_service.model import Batch

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(0))


def run(path: Path, device: str, dtype: str) -> torch.Tensor:
    """[24 + 4, vocab] float32 logits: the prompt, then 4 decode steps fed with the prompt's tokens."""
    model = build(path, device=device, dtype=dtype, max_batch_size=2, max_seq_len=64).model
    rows = [model(Batch(PROMPT, [1], [0], [24]), all_logits=True)]
    for pos, token in enumerate(PROMPT[:4].tolist(), start=24):
        rows.append(model(Batch(torch.tensor([token]), [1], [pos], [1])))
    return torch.cat(rows).cpu()


@requires_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_matches_cpu_float32(dtype, tiny_checkpoints):
    expected = run(tiny_checkpoints["hf"], "cpu", "float32")
    got = run(tiny_checkpoints["hf"], "cuda", dtype)
    if dtype == "float32":
        assert (got - expected).abs().max().item() <= 1e-3  # TF32-free fp32 GEMMs differ only in order
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min().item() > 0.99


@requires_cuda
def test_smollm2_on_cuda_in_bfloat16_answers_like_on_cpu():
    loaded = build(None, device="cuda", dtype="bfloat16", max_batch_size=1, max_seq_len=64)
    assert loaded.info.device.startswith("cuda") and loaded.model.layers[0].attention.cache.k.is_cuda
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]  # its tokenizer's ids for the prompt of test_model_smollm2
    cpu = build(None, max_batch_size=1, max_seq_len=64).model
    batch = Batch(torch.tensor(prompt), [0], [0], [len(prompt)])
    assert loaded.model(batch).argmax().item() == cpu(batch).argmax().item()


def _rank_run(rank: int, path: Path) -> torch.Tensor:
    return run(path, f"cuda:{rank}", "bfloat16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_over_nccl_matches_one_gpu(tiny_checkpoints):
    expected = run(tiny_checkpoints["meta"], "cuda", "bfloat16")
    for got in distributed.launch(2, _rank_run, tiny_checkpoints["meta"], device="cuda"):
        cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        assert cosine.min().item() > 0.999

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


@requires_cuda
def test_reduce_overhead_decodes_through_cuda_graphs_with_the_eager_logits(tiny_checkpoints):
    # Five prompts, then decode steps of 5, 3 and 1 sequences (rows padded to 8, 4, 2), each repeated so
    # that inductor records its graph (a shape's second run), over contexts that cross block-table widths.
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    counters.clear()
    models = {compile: build(tiny_checkpoints["hf"], device="cuda", dtype="float32", max_batch_size=8,
                             max_seq_len=128, compile=compile, compile_mode="reduce-overhead").model
              for compile in (False, True)}
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in (9, 20, 31, 14, 3)]
    positions = [len(p) for p in prompts]
    steps = [Batch(torch.cat(prompts), list(range(5)), [0] * 5, positions[:])]
    for count in (5, 3, 1):
        for _ in range(12):
            steps.append(Batch(torch.randint(0, 512, (count,), generator=gen), list(range(count)),
                               positions[:count], [1] * count))
            positions[:count] = [p + 1 for p in positions[:count]]
    for i, batch in enumerate(steps):
        got, expected = (models[compile](batch).cpu() for compile in (True, False))
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3, msg=lambda m, i=i: f"step {i}: {m}")
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.roots, "no CUDA graph was recorded"


def _rank_run(rank: int, path: Path) -> torch.Tensor:
    return run(path, f"cuda:{rank}", "bfloat16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_over_nccl_matches_one_gpu(tiny_checkpoints):
    expected = run(tiny_checkpoints["meta"], "cuda", "bfloat16")
    for got in distributed.launch(2, _rank_run, tiny_checkpoints["meta"], device="cuda"):
        cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        assert cosine.min().item() > 0.999

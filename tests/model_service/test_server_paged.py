"""The paged KV cache and the prefix cache through gRPC: ``python -m model_service`` with a small
pool (so preemption happens), its GetModelInfo, usage, GetLoad and metrics.

The truth for greedy output is the model core (``build()`` in this process) recomputing each
sequence on its own (``core_greedy`` of the slot-cache server tests).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from tests.model_service.test_server import core, core_greedy, generate, greedy, metric, request  # noqa: F401

POOL_TOKENS = 192  # 12 blocks of 16: four 60-token sequences do not fit together


def start(tiny_checkpoints, *extra: str) -> ServiceProcess:
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--max-batch-size", "4",
                          "--max-seq-len", "2048", "--kv-cache-tokens", str(POOL_TOKENS), "--prefill-chunk", "16",
                          *extra)
    proc.wait_healthy()
    return proc


@pytest.fixture(scope="module")
def paged(tiny_checkpoints):
    proc = start(tiny_checkpoints)
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log_text()


def info(proc: ServiceProcess) -> model_pb2.GetModelInfoResponse:
    with grpc.insecure_channel(proc.address) as channel:
        return model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())


def load(proc: ServiceProcess) -> model_pb2.Load:
    with grpc.insecure_channel(proc.address) as channel:
        return model_pb2_grpc.ModelServiceStub(channel).GetLoad(model_pb2.GetLoadRequest()).load


def test_model_info_and_start_up_line_state_the_cache(paged):
    got = info(paged)
    assert (got.kv_cache_tokens, got.kv_block_size, got.prefix_cache) == (POOL_TOKENS, 16, True)
    assert got.max_seq_len == 2048 and got.max_batch_size == 4  # independent of the cache's size
    assert '"kv_cache_tokens": 192' in paged.log_text() or "kv_cache_tokens=192" in paged.log_text()
    assert metric(paged, "llama_model_kv_blocks_total") == 12


def test_preempted_requests_resume_with_the_model_cores_tokens(paged, core):  # noqa: F811
    # Each runs its 50 tokens without a stop token (checked below): 4 blocks each, 16 > 12 in the pool.
    prompts = [[11 + i, 22, 33 + i, 44, 55, 66 + i, 77] for i in (0, 2, 3, 4)]
    preemptions = metric(paged, "llama_model_preemptions_total")

    async def together():
        return await asyncio.gather(*(generate(paged.address, request(p, **greedy(50))) for p in prompts))

    for prompt, (tokens, responses) in zip(prompts, asyncio.run(together()), strict=True):
        expected, reason = core_greedy(core, prompt, 50)
        assert len(expected) == 50 and tokens == expected and responses[-1].finish_reason == reason
        last = responses[-1]
        assert last.load.kv_blocks_total == 12 and last.load.kv_blocks_used <= 12
    assert metric(paged, "llama_model_preemptions_total") > preemptions
    assert metric(paged, "llama_model_kv_blocks_used") == 0
    now = load(paged)
    assert (now.running_sequences, now.queued_requests, now.kv_blocks_used, now.kv_blocks_total) == (0, 0, 0, 12)


def test_a_repeated_prompt_is_served_from_the_cache_with_the_same_tokens(paged, core):  # noqa: F811
    prompt = list(range(300, 340))  # 40 tokens: 2 full blocks
    hits_before = metric(paged, "llama_model_prefix_cache_hit_tokens_total")
    prompt_before = metric(paged, "llama_model_prompt_tokens_total")
    first, first_responses = asyncio.run(generate(paged.address, request(prompt, **greedy(6))))
    second, second_responses = asyncio.run(generate(paged.address, request(prompt, **greedy(6))))
    assert first == second == core_greedy(core, prompt, 6)[0]
    assert first_responses[-1].usage.cached_prompt_tokens == 0
    assert second_responses[-1].usage.cached_prompt_tokens == 32
    assert metric(paged, "llama_model_prefix_cache_hit_tokens_total") == hits_before + 32
    assert metric(paged, "llama_model_prompt_tokens_total") == prompt_before + 80


def test_a_request_that_can_never_fit_is_invalid_argument_with_both_numbers(paged):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(generate(paged.address, request(list(range(150)), **greedy(100))))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "250" in error.value.details() and "192" in error.value.details()


def test_no_prefix_cache(tiny_checkpoints, core):  # noqa: F811
    proc = start(tiny_checkpoints, "--no-prefix-cache", "--kv-block-size", "8")
    try:
        got = info(proc)
        assert (got.kv_cache_tokens, got.kv_block_size, got.prefix_cache) == (POOL_TOKENS, 8, False)
        prompt = list(range(300, 340))
        for _ in range(2):
            tokens, responses = asyncio.run(generate(proc.address, request(prompt, **greedy(6))))
            assert tokens == core_greedy(core, prompt, 6)[0] and responses[-1].usage.cached_prompt_tokens == 0
    finally:
        assert proc.stop() == 0, proc.log_text()


def test_n_completions_share_the_prompt_through_the_prefix_cache(paged, core):  # noqa: F811
    prompt = list(range(400, 440))  # 2 full blocks (the 40th token is always recomputed)
    _, responses = asyncio.run(generate(paged.address, request(prompt, n=3, **greedy(5))))
    last = {r.index: r for r in responses if r.finish_reason}
    tokens = {i: [t for r in responses if r.index == i for t in r.token_ids] for i in range(3)}
    assert tokens[0] == tokens[1] == tokens[2] == core_greedy(core, prompt, 5)[0]
    # The first computes the prompt; its siblings are submitted once it has, and reuse its blocks.
    assert [last[i].usage.cached_prompt_tokens for i in range(3)] == [0, 32, 32]

"""Tensor-parallel serving: ``--tp 2`` on CPU (gloo) from one command, against tp=1's model core."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from model_service.build import build
from tests.model_service.test_server import LONG_PROMPT, core_greedy, generate, greedy, request

MAX_SEQ_LEN = 2048


def rank_processes(proc: ServiceProcess) -> list[int]:
    """Pids of the spawned tensor-parallel ranks (children of the server running spawn_main)."""
    out = subprocess.run(["pgrep", "-P", str(proc.process.pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


@pytest.fixture(scope="module")
def core(tiny_checkpoints):
    return build(tiny_checkpoints["meta"], max_batch_size=1, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def tp_server(tiny_checkpoints):
    # The 1-file Meta checkpoint: each rank takes its half on load.
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--tp", "2",
                          "--max-batch-size", "4", "--max-seq-len", str(MAX_SEQ_LEN))
    try:
        proc.wait_healthy(timeout=180)
        yield proc
    finally:
        proc.stop()


def test_tp2_serves_the_same_greedy_tokens_as_tp1(tp_server, core):
    with grpc.insecure_channel(tp_server.address) as channel:
        info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())
    assert info.tensor_parallel_size == 2 and len(rank_processes(tp_server)) == 1
    prompts = [[11, 22, 33, 44, 55, 66, 77], [1], list(range(100, 140)), [300, 301, 302]]

    async def together():
        return await asyncio.gather(*(generate(tp_server.address, request(p, **greedy(16))) for p in prompts))

    for prompt, (tokens, responses) in zip(prompts, asyncio.run(together()), strict=True):
        expected, reason = core_greedy(core, prompt, 16)
        assert tokens == expected and responses[-1].finish_reason == reason


def test_tp2_n_completions_fork_the_cached_prompt_on_every_rank(tp_server, core):
    """n = 3 greedy: the forks share the prompt's blocks on both ranks and agree with tp=1."""
    prompt = list(range(200, 230))
    _, responses = asyncio.run(generate(tp_server.address, request(prompt, n=3, **greedy(12))))
    by_index: dict[int, list[int]] = {}
    for response in responses:
        by_index.setdefault(response.index, []).extend(response.token_ids)
    expected, _ = core_greedy(core, prompt, 12)
    assert by_index == {0: expected, 1: expected, 2: expected}


def test_tp2_prefix_hits_and_block_tables_reach_every_rank(tp_server, core):
    """A repeated prompt is served from cached blocks on both ranks (each holds its heads' share of
    every block; the block tables travel in the wire format) and gives the same tokens. The second
    request's own block comes after the first's cached fourth block, so decoding alone it is moved into
    one run of blocks: the copies travel in the wire format too, and every rank makes them."""
    prompt = list(range(300, 350))  # 3 full blocks of 16 reusable (no other test starts this way)
    first, first_responses = asyncio.run(generate(tp_server.address, request(prompt, **greedy(16))))
    second, second_responses = asyncio.run(generate(tp_server.address, request(prompt + [7], **greedy(8))))
    assert first == core_greedy(core, prompt, 16)[0]
    assert second == core_greedy(core, prompt + [7], 8)[0]
    assert first_responses[-1].usage.cached_prompt_tokens == 0
    assert second_responses[-1].usage.cached_prompt_tokens == 48


def hurt_rank_mid_stream(proc: ServiceProcess, sig: signal.Signals) -> tuple[grpc.aio.AioRpcError, int]:
    """Send ``sig`` to rank 1 while a generation streams; return the stream's error and what health
    said right after (NOT_SERVING when the server had already stopped answering)."""
    (rank1,) = rank_processes(proc)

    async def scenario():
        async with grpc.aio.insecure_channel(proc.address) as channel:
            call = model_pb2_grpc.ModelServiceStub(channel).Generate(request(LONG_PROMPT, **greedy(0)))
            await call.read()
            os.kill(rank1, sig)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                while await call.read() != grpc.aio.EOF:
                    pass
            try:
                status = (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                          timeout=5)).status
            except grpc.aio.AioRpcError:  # already gone: just as good for a probe
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            return error.value, status

    try:
        return asyncio.run(scenario())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank1, signal.SIGKILL)  # a stopped rank cannot act on SIGTERM


def test_a_dying_rank_fails_requests_and_exits_non_zero(tiny_checkpoints):
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta2"]), "--tp", "2",
                          "--max-batch-size", "2", "--max-seq-len", str(MAX_SEQ_LEN), "--grace-period", "30")
    try:
        proc.wait_healthy(timeout=180)
        error, status = hurt_rank_mid_stream(proc, signal.SIGKILL)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "restarting" in error.details()
        assert status != health_pb2.HealthCheckResponse.SERVING
        assert proc.process.wait(60) == 1  # no hang, and an orchestrator sees a failure
        events = [e.get("event") for e in proc.log_events()]
        assert "engine failed" in events and "model service failing" in events
    finally:
        proc.stop()
    assert not rank_processes(proc)


def test_a_wedged_rank_turns_health_not_serving_and_exits_non_zero(tiny_checkpoints):
    """SIGSTOP leaves rank 1 alive but silent: rank 0's next forward waits for it for ever. The step
    watchdog (--step-timeout) fails the engine: the in-flight call ends UNAVAILABLE, health stops
    saying SERVING, and the process exits 1 so the orchestrator replaces it."""
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta2"]), "--tp", "2",
                          "--max-batch-size", "2", "--max-seq-len", str(MAX_SEQ_LEN), "--step-timeout", "3")
    try:
        proc.wait_healthy(timeout=180)
        error, status = hurt_rank_mid_stream(proc, signal.SIGSTOP)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert status != health_pb2.HealthCheckResponse.SERVING
        assert proc.process.wait(60) == 1
        failed = [e for e in proc.log_events() if e.get("event") == "engine failed"]
        assert failed and "--step-timeout" in failed[0]["error"]
    finally:
        proc.stop()

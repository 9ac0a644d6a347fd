"""The model service for real: ``python -m model_service`` on 127.0.0.1, called over gRPC.

Weights: the session's tiny random Meta checkpoint (conftest). The truth for greedy output is the
model core (``build()`` in this process) recomputing each sequence on its own.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from model_service.build import build
from model_service.model import Batch

MAX_SEQ_LEN = 2048
LONG_PROMPT = [5, 6, 7, 8]  # on these weights greedy runs >= 600 tokens without a stop token (checked below)


def greedy(max_new_tokens: int = 0, **stopping) -> dict:
    return dict(sampling=common_pb2.SamplingParams(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping))


def request(prompt: list[int], **kwargs) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(prompt_token_ids=prompt, **kwargs)


async def generate(address: str, req: model_pb2.GenerateRequest, timeout: float | None = None):
    """(generated ids, responses)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        responses = [r async for r in stub.Generate(req, timeout=timeout)]
    return [t for r in responses for t in r.token_ids], responses


async def read_all(call) -> list:
    responses = []
    while (response := await call.read()) != grpc.aio.EOF:
        responses.append(response)
    return responses


def run(coro):
    return asyncio.run(coro)


def metric(proc: ServiceProcess, name: str, labels: dict | None = None) -> float:
    for family in text_string_to_metric_families(proc.metrics_text()):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    return 0.0


def wait_for(condition, timeout: float = 30.0) -> None:
    """Liveness only: the assertions are on what happens, not on how fast."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def core(tiny_checkpoints):
    return build(tiny_checkpoints["meta"], max_batch_size=1, max_seq_len=MAX_SEQ_LEN)


def core_greedy(core, prompt: list[int], n: int) -> tuple[list[int], int]:
    """The model core's greedy continuation (up to n tokens, stopping at the model's stop ids) and the
    finish reason the service should report."""
    model, stops = core.model, set(core.info.stop_token_ids)
    tokens = list(prompt)
    logits = model.forward(Batch(torch.tensor(tokens), [0], [0], [len(tokens)]))
    for _ in range(n):
        token = int(logits[0].argmax())
        if token in stops:
            return tokens[len(prompt):], common_pb2.FINISH_REASON_STOP_TOKEN
        tokens.append(token)
        logits = model.forward(Batch(torch.tensor([token]), [0], [len(tokens) - 1], [1]))
    return tokens[len(prompt):], common_pb2.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--max-batch-size", "8",
                          "--max-seq-len", str(MAX_SEQ_LEN), "--max-queue", "8", "--prefill-chunk", "16")
    try:
        proc.wait_healthy()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log_text()


def test_model_info(server, core):
    with grpc.insecure_channel(server.address) as channel:
        info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())
    assert (info.vocab_size, info.max_seq_len, info.max_batch_size, info.max_queue) == (512, MAX_SEQ_LEN, 8, 8)
    assert (info.family, info.checkpoint_format, info.tensor_parallel_size, info.dtype, info.device) == \
        ("llama", "meta", 1, "float32", "cpu")
    assert list(info.stop_token_ids) == core.info.stop_token_ids and info.parameter_count == core.info.parameter_count
    assert (info.quantization, info.compile) == ("none", "off")  # a float checkpoint runs as stored


def test_greedy_equals_the_model_core(server, core):
    prompt = [11, 22, 33, 44, 55, 66, 77]
    tokens, responses = run(generate(server.address, request(prompt, **greedy(24))))
    expected, reason = core_greedy(core, prompt, 24)
    assert tokens == expected
    last = responses[-1]
    assert last.finish_reason == reason
    assert (last.usage.prompt_tokens, last.usage.generated_tokens) == (len(prompt), len(expected))
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_eight_concurrent_requests_each_equal_their_solo_output(server, core):
    shapes = [(1, 20), (3, 5), (9, 33), (17, 12), (30, 8), (45, 40), (5, 1), (60, 25)]  # (prompt len, max new)
    requests = [request([(13 * n + 7 * i) % 500 for i in range(n)], **greedy(m)) for n, m in shapes]
    solo = [run(generate(server.address, r))[0] for r in requests]

    async def together():
        return await asyncio.gather(*(generate(server.address, r) for r in requests))

    steps_before = metric(server, "llama_model_step_seconds_count")
    concurrent = [tokens for tokens, _ in run(together())]
    steps = metric(server, "llama_model_step_seconds_count") - steps_before
    assert concurrent == solo
    for r, tokens in zip(requests, solo, strict=True):
        assert tokens == core_greedy(core, list(r.prompt_token_ids), r.stopping.max_new_tokens)[0]
    # Batched, not one after another: far fewer steps than the 144 tokens and 170 prompt tokens.
    assert steps < sum(m for _, m in shapes)


def test_a_late_request_joins_the_running_batch(server, core):
    long_tokens, _ = core_greedy(core, LONG_PROMPT, 600)
    assert len(long_tokens) == 600  # precondition: no stop token cuts the long stream short

    async def scenario():
        received = []
        short_done_at = None

        async def long():
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                async for response in stub.Generate(request(LONG_PROMPT, **greedy(600))):
                    received.extend(response.token_ids)
                    started.set()
            return response.finish_reason

        async def short():
            nonlocal short_done_at
            await started.wait()
            tokens, responses = await generate(server.address, request([40, 41, 42], **greedy(4)))
            short_done_at = len(received)  # how far the long stream had got when the short one finished
            return tokens

        started = asyncio.Event()
        long_reason, short_tokens = await asyncio.gather(long(), short())
        return received, long_reason, short_done_at, short_tokens

    received, long_reason, short_done_at, short_tokens = run(scenario())
    assert received == long_tokens and long_reason == common_pb2.FINISH_REASON_LENGTH
    assert short_tokens == core_greedy(core, [40, 41, 42], 4)[0]
    assert 0 < short_done_at < 600  # it finished while the long one was still streaming


def test_same_seed_same_tokens_alone_or_in_a_busy_batch(server):
    def sampled(prompt, seed, n=30):
        return request(prompt, sampling=common_pb2.SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=seed),
                       stopping=common_pb2.StoppingCriteria(max_new_tokens=n))

    target = sampled([3, 1, 4, 1, 5, 9, 2, 6], seed=2024)
    alone = run(generate(server.address, target))[0]

    async def busy():
        others = [sampled([i, i + 1, i + 2] * (i % 4 + 1), seed=i, n=40) for i in range(6)]
        results = await asyncio.gather(*(generate(server.address, r) for r in [*others[:3], target, *others[3:]]))
        return results[3][0]

    assert run(busy()) == alone
    assert run(generate(server.address, sampled([3, 1, 4, 1, 5, 9, 2, 6], seed=2025)))[0] != alone


def test_logprobs_and_echo(server, core):
    prompt = [100, 200, 300, 400, 150, 250]
    req = request(prompt, **greedy(3), output=common_pb2.OutputOptions(logprobs=True, top_logprobs=2, echo=True))
    tokens, responses = run(generate(server.address, req))
    full = prompt + tokens
    logprobs = torch.log_softmax(core.model.forward(Batch(torch.tensor(full), [0], [0], [len(full)]),
                                                    all_logits=True), dim=-1)
    first = responses[0]
    assert list(first.prompt_logprobs) == pytest.approx(
        [0.0] + [logprobs[i - 1, full[i]].item() for i in range(1, len(prompt))], abs=1e-4)
    assert [[c.token_id for c in t.candidates] for t in first.prompt_top_logprobs][1:] == \
        [logprobs[i - 1].topk(2).indices.tolist() for i in range(1, len(prompt))]
    assert [lp for r in responses for lp in r.logprobs] == pytest.approx(
        [logprobs[i - 1, full[i]].item() for i in range(len(prompt), len(full))], abs=1e-4)
    tops = [t for r in responses for t in r.top_logprobs]
    assert len(tops) == len(tokens) and all(t.candidates[0].token_id == tok for t, tok in zip(tops, tokens, strict=True))


def test_cancel_and_deadline_free_their_slots(server, core):
    cancelled_before = metric(server, "llama_model_finished_requests_total", {"reason": "cancelled"})

    async def cancel_after_first_chunk():
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = model_pb2_grpc.ModelServiceStub(channel).Generate(request(LONG_PROMPT, **greedy(600)))
            async for _ in call:
                break
            assert metric(server, "llama_model_running_sequences") == 1
            call.cancel()

    run(cancel_after_first_chunk())
    wait_for(lambda: metric(server, "llama_model_running_sequences") == 0)
    assert metric(server, "llama_model_kv_slots_used") == 0
    assert metric(server, "llama_model_finished_requests_total", {"reason": "cancelled"}) == cancelled_before + 1

    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(generate(server.address, request(LONG_PROMPT, **greedy(0)), timeout=0.25))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: metric(server, "llama_model_running_sequences") == 0)
    assert metric(server, "llama_model_kv_slots_used") == 0 and metric(server, "llama_model_queued_requests") == 0


def test_stop_token_ids_and_context_limit(server, core):
    prompt = [21, 22, 23]
    expected, _ = core_greedy(core, prompt, 10)
    stop = expected[4]
    tokens, responses = run(generate(server.address, request(prompt, **greedy(10, stop_token_ids=[stop]))))
    assert tokens == expected[:expected.index(stop)]
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP_TOKEN

    near_end = list(range(MAX_SEQ_LEN - 3))
    tokens, responses = run(generate(server.address, request([t % 256 for t in near_end], **greedy(0))))
    assert responses[-1].finish_reason in (common_pb2.FINISH_REASON_CONTEXT_LIMIT, common_pb2.FINISH_REASON_STOP_TOKEN)
    if responses[-1].finish_reason == common_pb2.FINISH_REASON_CONTEXT_LIMIT:
        assert len(tokens) == 3


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 512]), "prompt_token_ids"),
    (dict(prompt_token_ids=[-2]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1], sampling=common_pb2.SamplingParams(temperature=-0.5)), "sampling.temperature"),
    (dict(prompt_token_ids=[1], sampling=common_pb2.SamplingParams(temperature=math.nan)), "sampling.temperature"),
    (dict(prompt_token_ids=[1], sampling=common_pb2.SamplingParams(top_p=0.0)), "sampling.top_p"),
    (dict(prompt_token_ids=[1], sampling=common_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (dict(prompt_token_ids=[1], sampling=common_pb2.SamplingParams(top_k=-1)), "sampling.top_k"),
    (dict(prompt_token_ids=[1], sampling=common_pb2.SamplingParams(repetition_penalty=0)),
     "sampling.repetition_penalty"),
    (dict(prompt_token_ids=[1], stopping=common_pb2.StoppingCriteria(max_new_tokens=-1)), "stopping.max_new_tokens"),
    (dict(prompt_token_ids=[1], stopping=common_pb2.StoppingCriteria(stop_token_ids=[9999])),
     "stopping.stop_token_ids"),
    (dict(prompt_token_ids=[1], output=common_pb2.OutputOptions(top_logprobs=-1)), "output.top_logprobs"),
    (dict(prompt_token_ids=[1] * MAX_SEQ_LEN), "prompt_token_ids"),
    (dict(prompt_token_ids=[1] * 2000, stopping=common_pb2.StoppingCriteria(max_new_tokens=100,
                                                                            strict_context_limit=True)),
     "stopping.max_new_tokens"),
])
def test_bad_input_is_invalid_argument_naming_the_field(server, kwargs, field):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(generate(server.address, model_pb2.GenerateRequest(**kwargs)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


def test_context_errors_give_both_numbers(server):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(generate(server.address, request([1] * (MAX_SEQ_LEN + 10))))
    assert f"{MAX_SEQ_LEN + 10} tokens" in error.value.details() and str(MAX_SEQ_LEN) in error.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        run(generate(server.address, request([1] * 2000, stopping=common_pb2.StoppingCriteria(
            max_new_tokens=100, strict_context_limit=True))))
    assert "2100" in error.value.details() and str(MAX_SEQ_LEN) in error.value.details()
    assert metric(server, "llama_model_running_sequences") == 0


def test_request_id_reaches_the_engine_log(server):
    async def call():
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = model_pb2_grpc.ModelServiceStub(channel).Generate(
                request([1, 2, 3], **greedy(2)), metadata=(("x-request-id", "engine-log-check-1"),))
            [r async for r in call]
            return dict(await call.initial_metadata())

    assert run(call())["x-request-id"] == "engine-log-check-1"
    wait_for(lambda: any(e.get("request_id") == "engine-log-check-1" and e.get("event") == "generation finished"
                         for e in server.log_events()))


def test_queue_overflow_is_resource_exhausted_and_sigterm_drains(tiny_checkpoints):
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--max-batch-size", "1",
                          "--max-queue", "1", "--max-seq-len", str(MAX_SEQ_LEN), "--grace-period", "60")
    try:
        proc.wait_healthy()

        async def scenario():
            async with grpc.aio.insecure_channel(proc.address) as channel:
                stub = model_pb2_grpc.ModelServiceStub(channel)
                running = stub.Generate(request(LONG_PROMPT, **greedy(600)))
                await running.read()  # has its slot and is decoding
                queued = stub.Generate(request([9, 8, 7], **greedy(3)))
                await queued.initial_metadata()
                wait_for(lambda: metric(proc, "llama_model_queued_requests") == 1)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    [r async for r in stub.Generate(request([1, 2], **greedy(2)))]
                assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # SIGTERM now: health goes NOT_SERVING, new calls are refused, both accepted calls finish.
                proc.process.terminate()
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    try:  # NOT_SERVING for a moment, then refused once the server stops taking calls
                        reply = await health.Check(health_pb2.HealthCheckRequest())
                        if reply.status != health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.aio.AioRpcError as error:  # the server stopped taking calls mid-check
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                        break
                    await asyncio.sleep(0.02)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    [r async for r in stub.Generate(request([1, 2], **greedy(2)))]
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                return await read_all(running), await read_all(queued)

        rest, queued_responses = run(scenario())
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and rest[-1].usage.generated_tokens == 600
        assert queued_responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert proc.process.wait(60) == 0
    finally:
        proc.stop()


def test_a_dropped_connection_frees_its_slot(server):
    """The client process dies mid-stream (no cancel sent): the server notices the connection go."""
    client = f"""
import os, grpc
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from llama_grpc_stubs.common.v1 import common_pb2
stub = model_pb2_grpc.ModelServiceStub(grpc.insecure_channel("{server.address}"))
stream = stub.Generate(model_pb2.GenerateRequest(prompt_token_ids={LONG_PROMPT},
    sampling=common_pb2.SamplingParams(temperature=0), stopping=common_pb2.StoppingCriteria(max_new_tokens=600)))
next(stream)
print("streaming", flush=True)
os._exit(0)
"""
    cancelled_before = metric(server, "llama_model_finished_requests_total", {"reason": "cancelled"})
    result = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=60)
    assert "streaming" in result.stdout, result.stderr
    wait_for(lambda: metric(server, "llama_model_finished_requests_total", {"reason": "cancelled"})
             == cancelled_before + 1)
    wait_for(lambda: metric(server, "llama_model_running_sequences") == 0)
    assert metric(server, "llama_model_kv_slots_used") == 0


def test_latency_metrics_are_recorded(server):
    before = {name: metric(server, name) for name in (
        "llama_model_time_to_first_token_seconds_count", "llama_model_inter_token_latency_seconds_count",
        "llama_model_step_seconds_count", "llama_model_generated_tokens_total")}
    tokens, _ = run(generate(server.address, request([7, 8, 9], **greedy(5))))
    assert metric(server, "llama_model_time_to_first_token_seconds_count") == \
        before["llama_model_time_to_first_token_seconds_count"] + 1
    assert metric(server, "llama_model_inter_token_latency_seconds_count") == \
        before["llama_model_inter_token_latency_seconds_count"] + len(tokens) - 1
    assert metric(server, "llama_model_generated_tokens_total") == before["llama_model_generated_tokens_total"] + len(tokens)
    assert metric(server, "llama_model_step_seconds_count") > before["llama_model_step_seconds_count"]
    assert metric(server, "llama_model_requests_total", {"method": "Generate", "code": "OK"}) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_serves_the_model_cores_greedy_tokens(tiny_checkpoints, core):
    prompt = [11, 22, 33, 44, 55, 66, 77]
    with ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--device", "cuda",
                        "--dtype", "float32", "--max-seq-len", "512") as proc:
        proc.wait_healthy()
        tokens, _ = run(generate(proc.address, request(prompt, **greedy(16))))
    assert tokens == core_greedy(core, prompt, 16)[0]

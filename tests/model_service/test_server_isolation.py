"""Extreme sampling values sent straight to the model service, beside an innocent greedy stream.

The issue this guards: ``temperature: 1e-38`` or ``repetitionPenalty: 1e-38`` used to turn logits into
inf/NaN and fail the whole engine step, so every request in that step ended INTERNAL, and under
``--tp 2`` the service went down. Now each extreme request gets INVALID_ARGUMENT or a normal answer,
the innocent stream's tokens equal its solo run (the model core recomputing it), and the service
stays up, at tp=1 and tp=2.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.common.v1 import common_pb2
from model_service.build import build
from tests.model_service.test_server import LONG_PROMPT, MAX_SEQ_LEN, core_greedy, generate, greedy, request


@pytest.fixture(scope="module")
def core(tiny_checkpoints):
    return build(tiny_checkpoints["meta"], max_batch_size=1, max_seq_len=MAX_SEQ_LEN)


EXTREMES = [
    dict(temperature=1e-38), dict(temperature=1e-45), dict(temperature=3.4e38),
    dict(repetition_penalty=1e-38), dict(repetition_penalty=1e38), dict(temperature=1e-38, repetition_penalty=1e-38),
    dict(top_k=2**31 - 1), dict(top_p=1e-38), dict(top_k=2**31 - 1, top_p=1e-38, temperature=1e-38),
    dict(temperature=1.0, repetition_penalty=100.0), dict(temperature=1.0, repetition_penalty=0.01),
]


def check_isolation(address: str, core) -> None:
    innocent = request(LONG_PROMPT, **greedy(48))

    async def scenario():
        async def extreme(fields: dict):
            sampling = common_pb2.SamplingParams(seed=7, **fields)
            try:
                return await generate(address, request([9, 10, 11, 12], sampling=sampling,
                                                       stopping=common_pb2.StoppingCriteria(max_new_tokens=12)))
            except grpc.aio.AioRpcError as error:
                return error

        async def innocent_after_start():
            return await generate(address, innocent)

        return await asyncio.gather(innocent_after_start(), *(extreme(f) for f in EXTREMES))

    (tokens, responses), *extremes = asyncio.run(scenario())
    expected, reason = core_greedy(core, LONG_PROMPT, 48)
    assert tokens == expected and responses[-1].finish_reason == reason
    for fields, outcome in zip(EXTREMES, extremes, strict=True):
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, outcome)
            assert "sampling." in outcome.details()
        else:
            generated, final = outcome
            assert final[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_TOKEN)
            assert len(generated) == final[-1].usage.generated_tokens, fields
    refused = {tuple(f) for f, o in zip(EXTREMES, extremes, strict=True) if isinstance(o, grpc.aio.AioRpcError)}
    assert ("repetition_penalty",) in refused  # 1e-38 and 1e38 are outside its range
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("tp", [1, 2])
def test_extreme_values_never_hurt_a_neighbour(tiny_checkpoints, core, tp):
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--tp", str(tp),
                          "--max-batch-size", "16", "--max-seq-len", str(MAX_SEQ_LEN))
    try:
        proc.wait_healthy(timeout=180)
        check_isolation(proc.address, core)
        assert proc.process.poll() is None  # still serving
    finally:
        proc.stop()

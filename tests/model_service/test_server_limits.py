"""--max-new-tokens-limit on a real model service: above it INVALID_ARGUMENT, unset means the limit,
GetModelInfo reports it. The truth for the tokens is the model core's greedy continuation."""

from __future__ import annotations

import grpc
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from model_service.build import build
from tests.model_service.test_server import (
    LONG_PROMPT,
    MAX_SEQ_LEN,
    core_greedy,
    generate,
    greedy,
    request,
    run,
)

LIMIT = 5


@pytest.fixture(scope="module")
def core(tiny_checkpoints):
    return build(tiny_checkpoints["meta"], max_batch_size=1, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def limited(tiny_checkpoints):
    proc = ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--max-batch-size", "2",
                          "--max-seq-len", str(MAX_SEQ_LEN), "--max-new-tokens-limit", str(LIMIT))
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def test_info_reports_the_limit(limited):
    with grpc.insecure_channel(limited.address) as channel:
        info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())
    assert info.max_new_tokens_limit == LIMIT


def test_unset_max_new_tokens_means_the_limit(limited, core):
    tokens, responses = run(generate(limited.address, request(LONG_PROMPT, **greedy())))
    expected, _ = core_greedy(core, LONG_PROMPT, LIMIT)  # LONG_PROMPT meets no stop token this early
    assert tokens == expected and len(tokens) == LIMIT
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_at_or_below_the_limit_is_served(limited, core):
    for n in (3, LIMIT):
        tokens, _ = run(generate(limited.address, request(LONG_PROMPT, **greedy(n))))
        assert tokens == core_greedy(core, LONG_PROMPT, n)[0]


def test_above_the_limit_is_invalid_argument(limited):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        run(generate(limited.address, request(LONG_PROMPT, **greedy(LIMIT + 1))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (f"stopping.max_new_tokens: {LIMIT + 1} is more than this server's limit of "
                                      f"{LIMIT} (--max-new-tokens-limit)")

"""The tokenizer service's own caps, on a real server: Decode / DecodeStream ids, chat message count,
and roles counted with content against --max-input-chars."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.health import is_serving
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2 as pb
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2_grpc
from tests.tokenizer_service.hf_reference import hf_tokenizer_from_gguf


@pytest.fixture(scope="module")
def stub(llama3_path: Path) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    flags = ["--tokenizer", str(llama3_path), "--max-decode-ids", "100", "--max-chat-messages", "3",
             "--max-input-chars", "50"]
    with ServiceProcess("tokenizer_service", *flags) as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)


def refusal(call, request) -> grpc.RpcError:  # noqa: ANN001 -- a unary stub method and its request
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


def test_decode_ids_are_capped(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    assert stub.Decode(pb.DecodeRequest(token_ids=[3492] * 100), timeout=10).text == " word" * 100
    error = refusal(stub.Decode, pb.DecodeRequest(token_ids=[3492] * 101))
    assert "token_ids: 101 token ids is more than the limit of 100 (--max-decode-ids)" in error.details()


def test_decode_stream_ids_are_capped_over_the_whole_stream(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    messages = [pb.DecodeStreamRequest(token_ids=[3492] * 60), pb.DecodeStreamRequest(token_ids=[3492] * 41)]
    with pytest.raises(grpc.RpcError) as caught:
        replies = stub.DecodeStream(iter(messages), timeout=10)
        assert next(replies).text == " word" * 60  # the first message is inside the cap
        next(replies)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "101 token ids" in caught.value.details() and "--max-decode-ids" in caught.value.details()


def test_chat_message_count_is_capped(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    messages = [common_pb2.Message(role="user", content="hi")] * 4
    error = refusal(stub.ApplyChatTemplate, pb.ApplyChatTemplateRequest(messages=messages))
    assert "4 messages is more than the limit of 3 (--max-chat-messages)" in error.details()
    assert stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=messages[:3]), timeout=10).token_ids


def test_roles_count_with_content_against_the_input_limit(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    content = "x" * 45
    ok = pb.ApplyChatTemplateRequest(messages=[common_pb2.Message(role="user", content=content)])  # 4 + 45
    assert stub.ApplyChatTemplate(ok, timeout=10).token_ids
    over = pb.ApplyChatTemplateRequest(messages=[common_pb2.Message(role="assistant", content=content)])  # 9 + 45
    assert "54 characters is more than the limit of 50" in refusal(stub.ApplyChatTemplate, over).details()


def test_health_answers_while_hostile_chat_templates_run(tmp_path: Path, smollm_path: Path) -> None:
    """A model whose own chat template loops for ever: each call ends at the render budget with
    INVALID_ARGUMENT, in the chat template worker processes, and health keeps answering meanwhile."""
    hf = hf_tokenizer_from_gguf.__wrapped__(smollm_path)
    hf.save(str(tmp_path / "tokenizer.json"))
    hostile = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": hostile}))
    with ServiceProcess("tokenizer_service", "--tokenizer", str(tmp_path), "--chat-template-workers", "2") as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            request = pb.ApplyChatTemplateRequest(messages=[common_pb2.Message(role="user", content="hi")])
            calls = [stub.ApplyChatTemplate.future(request, timeout=60) for _ in range(4)]
            answered = 0
            while not all(call.done() for call in calls):
                assert is_serving(channel, timeout=5)  # generous: the point is that it answers at all
                answered += 1
                time.sleep(0.1)
            for call in calls:
                assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "exceeded its budget" in call.details()
    assert answered > 0

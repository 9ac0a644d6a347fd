"""Limits every server enforces, through a real tokenizer-service process: message size, concurrent
calls, unparseable protobuf, a client that stops reading, a port already taken, short error
messages; and health keeps answering while they are abused."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.assets import llama3_tokenizer_path
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2 as pb
from llama_grpc_stubs.tokenizer.v1.tokenizer_pb2_grpc import TokenizerServiceStub

SERVICE = "/llama.tokenizer.v1.TokenizerService"
MAX_CALLS = 3


@pytest.fixture(scope="module")
def server() -> Iterator[ServiceProcess]:
    flags = ["--tokenizer", str(llama3_tokenizer_path()), "--max-message-bytes", "100000",
             "--max-concurrent-rpcs", str(MAX_CALLS), "--stall-timeout", "2"]
    with ServiceProcess("tokenizer_service", *flags) as process:
        yield process.wait_healthy()


@pytest.fixture
def channel(server: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_messages_over_the_limit_are_refused(channel: grpc.Channel) -> None:
    stub = TokenizerServiceStub(channel)
    assert list(stub.Encode(pb.EncodeRequest(text=" word" * 10_000), timeout=30).token_ids) == [3492] * 10_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.Encode(pb.EncodeRequest(text=" word" * 30_000), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A reply over the limit is refused too, not sent: 30k ids decode to 150k characters.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Decode(pb.DecodeRequest(token_ids=[3492] * 30_000), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11],
                         ids=["bad-tag", "truncated-string", "bad-varint"])
def test_unparseable_protobuf_is_invalid_argument(channel: grpc.Channel, payload: bytes) -> None:
    raw = channel.unary_unary(f"{SERVICE}/Encode", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        raw(payload, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid llama.tokenizer.v1.EncodeRequest protobuf message" in caught.value.details()


def test_unparseable_message_in_a_stream_is_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.stream_stream(f"{SERVICE}/DecodeStream", request_serializer=None, response_deserializer=None)
    good = pb.DecodeStreamRequest(token_ids=[9906]).SerializeToString()
    with pytest.raises(grpc.RpcError) as caught:
        list(raw(iter([good, b"\xff\xff\xff"]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DecodeStreamRequest" in caught.value.details()


def test_calls_beyond_the_limit_are_refused_at_once_and_health_still_answers(channel: grpc.Channel) -> None:
    stub = TokenizerServiceStub(channel)
    release = threading.Event()

    def held() -> Iterator[pb.DecodeStreamRequest]:
        yield pb.DecodeStreamRequest(token_ids=[9906])
        release.wait(60)

    streams = [stub.DecodeStream(held(), timeout=60) for _ in range(MAX_CALLS)]
    try:
        for stream in streams:
            next(stream)  # each is admitted and running
        with pytest.raises(grpc.RpcError) as caught:
            stub.Encode(pb.EncodeRequest(text="hi"), timeout=30)  # not a hang: refused
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-rpcs" in caught.value.details()
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        for stream in streams:
            list(stream)
    assert list(stub.Encode(pb.EncodeRequest(text="hi"), timeout=30).token_ids) == [6151]


def test_a_client_that_stops_reading_loses_its_stream(server: ServiceProcess, channel: grpc.Channel) -> None:
    stub = TokenizerServiceStub(channel)

    def requests() -> Iterator[pb.DecodeStreamRequest]:
        for _ in range(2000):  # ~2 GB of replies if anyone read them
            yield pb.DecodeStreamRequest(token_ids=[3492] * 19_000)

    stream = stub.DecodeStream(requests(), timeout=120)  # never read while the server writes
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "--stall-timeout" not in server.log_text():
        time.sleep(0.2)
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "read nothing for 2 s" in caught.value.details()


def test_error_messages_quote_only_a_short_prefix(channel: grpc.Channel) -> None:
    role = "r" * 50_000
    with pytest.raises(grpc.RpcError) as caught:
        TokenizerServiceStub(channel).ApplyChatTemplate(pb.ApplyChatTemplateRequest(
            messages=[common_pb2.Message(role=role, content="hi")]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details()) < 1000


def test_a_port_in_use_stops_the_second_server(server: ServiceProcess) -> None:
    with ServiceProcess("tokenizer_service", "--tokenizer", str(llama3_tokenizer_path()), port=server.port) as second:
        assert second.process.wait(60) != 0
        assert f"cannot listen on 127.0.0.1:{server.port}" in second.log_text()
        assert "another server" in second.log_text()


def test_a_metrics_port_in_use_stops_the_second_server(server: ServiceProcess) -> None:
    with ServiceProcess("tokenizer_service", "--tokenizer", str(llama3_tokenizer_path()),
                        metrics_port=server.metrics_port) as second:
        assert second.process.wait(60) != 0
        assert f"cannot serve metrics on 127.0.0.1:{server.metrics_port}" in second.log_text()

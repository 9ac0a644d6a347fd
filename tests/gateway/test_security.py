"""Every hop secured, end to end: `python -m llama_grpc_devtools.stack --secrets DIR` (what `make run TLS=1` runs)
with certificates and tokens made in the test. The gateway answers a client with the CA and a token;
the tokenizer and model answer only a caller with a client certificate of the CA and their token;
no token, a wrong token, no client certificate, another CA's certificate and plaintext are refused."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests import REPO
from tests.gateway.test_clients import PARIS_ANSWER, _interrupt, _stack, _wait_for_banner, run
from tests.pki import make_pki


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    pki = make_pki(tmp_path_factory.mktemp("secrets"))
    process = _stack("--secrets", str(pki.directory))
    try:
        address, _, banner = _wait_for_banner(process)
        yield pki, address, banner
        stderr = _interrupt(process)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_the_client_with_ca_and_token_gets_the_answer(secured) -> None:
    pki, address, banner = secured
    answer = run(sys.executable, "-m", "gateway.client", "chat", "What is the capital of France?", "--temperature",
                 "0", "--address", address, "--tls-ca", pki.path("ca.crt"), "--token-file", pki.path("gateway-tokens"))
    assert answer.stdout.strip() == PARIS_ANSWER
    assert any(f"--tls-ca {pki.path('ca.crt')}" in line for line in banner)  # the banner says how


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "fragment"), [
    (["--tls-ca", "CA"], "missing bearer token"),
    (["--tls-ca", "CA", "--token-file", "UPSTREAM"], "not accepted"),  # the upstreams' token is not a client's
    ([], "UNAVAILABLE"),  # plaintext to a TLS port
], ids=["no-token", "wrong-token", "plaintext"])
def test_the_gateway_refuses_clients_without_ca_or_token(secured, flags: list[str], fragment: str) -> None:
    pki, address, _ = secured
    flags = [pki.path("ca.crt") if f == "CA" else pki.path("upstream-tokens") if f == "UPSTREAM" else f for f in flags]
    done = subprocess.run([sys.executable, "-m", "gateway.client", "chat", "hi", "--address", address, *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert fragment in done.stderr


def _tokenizer_encode(address: str, credentials: grpc.ChannelCredentials | None, token: str | None) -> list[int]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        return list(stub.Encode(tokenizer_pb2.EncodeRequest(text="Paris"), metadata=metadata, timeout=30).token_ids)


@pytest.mark.slow
def test_the_upstreams_answer_only_the_gateways_certificate_and_token(secured) -> None:
    pki, address, _ = secured
    host, port = address.rsplit(":", 1)
    tokenizer = f"{host}:{int(port) + 1}"
    token = pki.token("upstream-tokens")
    # What the gateway presents: a certificate of the CA and the upstream token.
    assert _tokenizer_encode(tokenizer, pki.credentials("gateway-client"), token) == \
        _tokenizer_encode(tokenizer, pki.credentials("client"), token)  # any certificate of the CA will do
    refusals = {
        "no token": (pki.credentials("gateway-client"), None, grpc.StatusCode.UNAUTHENTICATED),
        "client token": (pki.credentials("gateway-client"), pki.token("gateway-tokens"), grpc.StatusCode.UNAUTHENTICATED),
        "no client certificate": (pki.credentials(None), token, grpc.StatusCode.UNAVAILABLE),
        "another CA": (pki.credentials("stranger"), token, grpc.StatusCode.UNAVAILABLE),
        "plaintext": (None, token, grpc.StatusCode.UNAVAILABLE),
    }
    for case, (credentials, presented, code) in refusals.items():
        with pytest.raises(grpc.RpcError) as caught:
            _tokenizer_encode(tokenizer, credentials, presented)
        assert caught.value.code() == code, case
    model = f"{host}:{int(port) + 2}"
    with grpc.secure_channel(model, pki.credentials("gateway-client")) as channel:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        assert stub.GetModelInfo(model_pb2.GetModelInfoRequest(), metadata=(("authorization", f"Bearer {token}"),),
                                 timeout=30).vocab_size > 0
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_gateway_info_over_tls(secured) -> None:
    pki, address, _ = secured
    with grpc.secure_channel(address, pki.credentials(None)) as channel:
        info = gateway_pb2_grpc.GatewayServiceStub(channel).GetInfo(
            gateway_pb2.GetInfoRequest(), metadata=(("authorization", f"Bearer {pki.token('gateway-tokens')}"),),
            timeout=30)
    assert info.model.vocab_size == info.tokenizer.vocab_size > 0

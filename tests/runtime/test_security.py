"""Every server's TLS, mutual TLS and bearer tokens, through a real tokenizer-service process (the
shared runtime does the same for all three): a good certificate and token get an answer; no token,
a wrong token, no client certificate, a certificate from another CA and plaintext are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.assets import llama3_tokenizer_path
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2 as pb
from llama_grpc_stubs.tokenizer.v1.tokenizer_pb2_grpc import TokenizerServiceStub
from tests import REPO
from tests.pki import Pki, make_pki

# Meta's reference: "This is a test sentence." with BOS.
GOLDEN = [128000, 2028, 374, 264, 1296, 11914, 13]
REQUEST = pb.EncodeRequest(text="This is a test sentence.", add_bos=True)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"# rotated weekly\n{pki.token()}\n\n")
    flags = [*pki.server_flags("tokenizer", tokens=None), "--auth-token-file", str(tokens)]
    with ServiceProcess("tokenizer_service", "--tokenizer", str(llama3_tokenizer_path()), *flags) as process:
        process.tokens = tokens
        yield process.wait_healthy(credentials=pki.credentials())


def call(server: ServiceProcess, credentials: grpc.ChannelCredentials | None, token: str | None,
         request: pb.EncodeRequest = REQUEST) -> list[int]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    channel = grpc.secure_channel(server.address, credentials) if credentials else grpc.insecure_channel(server.address)
    with channel:
        return list(TokenizerServiceStub(channel).Encode(request, metadata=metadata, timeout=10).token_ids)


def refused(server: ServiceProcess, credentials: grpc.ChannelCredentials | None, token: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(server, credentials, token)
    return caught.value


def test_good_certificate_and_token_get_an_answer(server: ServiceProcess, pki: Pki) -> None:
    assert call(server, pki.credentials(), pki.token()) == GOLDEN


def test_missing_and_wrong_tokens_are_unauthenticated_without_echo(server: ServiceProcess, pki: Pki) -> None:
    missing = refused(server, pki.credentials(), None)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in missing.details()
    wrong_token = "wrong-" + pki.token()[:10]
    wrong = refused(server, pki.credentials(), wrong_token)
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not accepted" in wrong.details() and wrong_token not in wrong.details()
    malformed = pki.token()  # without the Bearer scheme
    with grpc.secure_channel(server.address, pki.credentials()) as channel, pytest.raises(grpc.RpcError) as caught:
        TokenizerServiceStub(channel).Encode(REQUEST, metadata=(("authorization", malformed),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in caught.value.details()
    assert malformed not in caught.value.details()
    logs = server.log_text()
    assert "UNAUTHENTICATED" in logs  # refusals are logged ...
    assert pki.token() not in logs and wrong_token not in logs  # ... without any token


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-client-certificate", "certificate-of-another-ca"])
def test_clients_without_a_trusted_certificate_are_refused(server: ServiceProcess, pki: Pki, client: str | None) -> None:
    error = refused(server, pki.credentials(client), pki.token())
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no call is made


def test_plaintext_is_refused(server: ServiceProcess, pki: Pki) -> None:
    assert refused(server, None, pki.token()).code() == grpc.StatusCode.UNAVAILABLE


def test_health_is_open_without_a_token_and_reflection_is_not(server: ServiceProcess, pki: Pki) -> None:
    with grpc.secure_channel(server.address, pki.credentials()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def list_services(token: str | None) -> list[str]:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with grpc.secure_channel(server.address, pki.credentials()) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                metadata=metadata, timeout=10)
            return [service.name for reply in replies for service in reply.list_services_response.service]

    with pytest.raises(grpc.RpcError) as caught:
        list_services(None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "llama.tokenizer.v1.TokenizerService" in list_services(pki.token())


def test_the_token_file_is_reloaded_when_it_changes(server: ServiceProcess, pki: Pki) -> None:
    old, new = pki.token(), "rotated-" + pki.token()[::-1]
    try:
        server.tokens.write_text(f"{old}\n{new}\n")  # rotation: both accepted
        assert call(server, pki.credentials(), new) == GOLDEN
        assert call(server, pki.credentials(), old) == GOLDEN
        server.tokens.write_text(f"{new}\n")  # the old one removed
        assert refused(server, pki.credentials(), old).code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(server, pki.credentials(), new) == GOLDEN
    finally:
        server.tokens.write_text(f"{old}\n")


def test_the_image_health_check_speaks_mutual_tls(server: ServiceProcess, pki: Pki) -> None:
    """What the exec probes of deploy/k8s/components/tls and the Compose tls variant run."""
    env = {**os.environ, "LLAMA_TOKENIZER_PORT": str(server.port), "LLAMA_TOKENIZER_TLS_CERT": pki.path("tokenizer.crt"),
           "LLAMA_TOKENIZER_TLS_KEY": pki.path("tokenizer.key"), "LLAMA_TOKENIZER_TLS_CLIENT_CA": pki.path("ca.crt")}
    command = [sys.executable, "-m", "llama_grpc_runtime.healthcheck", "--service", "tokenizer"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
    # Without the client-CA variable it presents no certificate, and the server refuses the handshake.
    del env["LLAMA_TOKENIZER_TLS_CLIENT_CA"]
    assert subprocess.run(command, env=env, capture_output=True, timeout=60, cwd=REPO).returncode == 1


def test_tls_without_client_certificates_or_tokens(pki: Pki) -> None:
    """--tls-cert/--tls-key alone: any client that trusts the server's CA is served, plaintext is not."""
    with ServiceProcess("tokenizer_service", "--tokenizer", str(llama3_tokenizer_path()),
                        *pki.server_flags("tokenizer", mutual=False, tokens=None)) as server:
        server.wait_healthy(credentials=pki.credentials(None))
        assert call(server, pki.credentials(None), None) == GOLDEN
        assert refused(server, None, None).code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-client-ca", "CA"], "--tls-cert and --tls-key go together"),
    (["--auth-token-file", "/nonexistent/tokens"], "--auth-token-file"),
    (["--auth-token-file", "EMPTY"], "holds no token"),
], ids=["client-ca-without-cert", "missing-token-file", "empty-token-file"])
def test_bad_security_settings_stop_the_server_with_a_message(pki: Pki, tmp_path: Path, flags: list[str],
                                                              message: str) -> None:
    (tmp_path / "empty").write_text("\n# nothing\n")
    flags = [pki.path("ca.crt") if f == "CA" else str(tmp_path / "empty") if f == "EMPTY" else f for f in flags]
    with ServiceProcess("tokenizer_service", "--tokenizer", str(llama3_tokenizer_path()), *flags) as server:
        deadline = time.monotonic() + 60
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.process.returncode not in (None, 0)
        assert message in server.log_text()


def test_open_reflection_lists_without_a_token_but_calls_still_need_one(pki: Pki) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with ServiceProcess("tokenizer_service", "--tokenizer", str(llama3_tokenizer_path()),
                        *pki.server_flags("tokenizer"), "--open-reflection") as server:
        server.wait_healthy(credentials=pki.credentials())
        with grpc.secure_channel(server.address, pki.credentials()) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)
            names = [service.name for reply in replies for service in reply.list_services_response.service]
        assert "llama.tokenizer.v1.TokenizerService" in names
        assert refused(server, pki.credentials(), None).code() == grpc.StatusCode.UNAUTHENTICATED

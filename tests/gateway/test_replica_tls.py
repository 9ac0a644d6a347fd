"""Replicas found by a DNS name are dialled by IP address, one channel each, but over TLS their
certificates are checked against the name (as in Kubernetes, where a headless Service's name is in
the certificate and the pods' addresses are not)."""

from __future__ import annotations

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.pki import make_pki, make_secrets

from .conftest import GREEDY, PARIS, start_gateway, start_model, start_tokenizer


@pytest.mark.slow
def test_a_replica_found_by_dns_is_checked_against_the_name_not_its_address(tmp_path):
    pki = make_pki(tmp_path)
    ca = (x509.load_pem_x509_certificate(pki.read("ca.crt")),
          serialization.load_pem_private_key(pki.read("ca.key"), password=None))
    cert, key = make_secrets.issue(ca, "model by name", dns_names=["localhost"], ips=[])  # no IP in it
    (tmp_path / "named.crt").write_bytes(make_secrets.cert_pem(cert))
    (tmp_path / "named.key").write_bytes(make_secrets.key_pem(key))
    upstream = ["--upstream-tls-ca", pki.path("ca.crt"), "--upstream-tls-cert", pki.path("gateway-client.crt"),
                "--upstream-tls-key", pki.path("gateway-client.key"),
                "--upstream-auth-token-file", pki.path("upstream-tokens")]
    with start_tokenizer(*pki.server_flags("tokenizer")) as tokenizer, \
            start_model("--tls-cert", pki.path("named.crt"), "--tls-key", pki.path("named.key"),
                        "--tls-client-ca", pki.path("ca.crt"), "--auth-token-file", pki.path("upstream-tokens")) as model, \
            start_gateway(tokenizer.address, f"dns:///localhost:{model.port}", *upstream) as gateway:
        # SERVING only once both upstreams answered over TLS (the model's certificate checked as "localhost").
        gateway.wait_healthy(timeout=120)
        with grpc.insecure_channel(gateway.address) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(gateway_pb2.GenerateRequest(
                messages=PARIS, sampling=GREEDY, stopping=common_pb2.StoppingCriteria(max_new_tokens=3)), timeout=60)
        assert reply.text == "The capital of"

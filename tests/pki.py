"""Certificates and tokens made in the test: deploy/make_secrets.py's layout, plus a second CA whose
client certificate no server trusts."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests import REPO

_spec = importlib.util.spec_from_file_location("make_secrets", REPO / "deploy" / "make_secrets.py")
make_secrets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_secrets)


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def token(self, name: str = "upstream-tokens") -> str:
        return (self.directory / name).read_text().split()[0]

    def server_flags(self, service: str, *, mutual: bool = True, tokens: str | None = "upstream-tokens") -> list[str]:
        flags = ["--tls-cert", self.path(f"{service}.crt"), "--tls-key", self.path(f"{service}.key")]
        if mutual:
            flags += ["--tls-client-ca", self.path("ca.crt")]
        if tokens:
            flags += ["--auth-token-file", self.path(tokens)]
        return flags

    def credentials(self, client: str | None = "client") -> grpc.ChannelCredentials:
        """Trusts the CA; presents ``client``.crt/.key (None: no client certificate)."""
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=self.read("ca.crt"))
        return grpc.ssl_channel_credentials(root_certificates=self.read("ca.crt"), private_key=self.read(f"{client}.key"),
                                            certificate_chain=self.read(f"{client}.crt"))


def make_pki(directory: Path) -> Pki:
    make_secrets.write_secrets(directory)
    other_ca = make_secrets.make_ca("some other CA")
    cert, key = make_secrets.issue(other_ca, "stranger", server=False)
    (directory / "stranger.crt").write_bytes(make_secrets.cert_pem(cert))
    (directory / "stranger.key").write_bytes(make_secrets.key_pem(key))
    return Pki(directory)

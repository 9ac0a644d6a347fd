"""Write a private CA, certificates and bearer tokens for llama-grpc's TLS/mTLS + token mode.

    python deploy/make_secrets.py DIR [--names gateway.example.com ...]

DIR then holds (PEM; keys 0600, or 0644 with --world-readable for containers that run as another uid):
  ca.crt, ca.key                   the CA every server trusts for client certificates, and clients trust
  gateway.crt/.key                 the gateway's server certificate (DNS names: localhost, llama-gateway, --names)
  tokenizer.crt/.key, model.crt/.key
                                   upstream server certificates; usable as client certificates too, so a
                                   container's health check can present its own under mTLS
  gateway-client.crt/.key          what the gateway presents to tokenizer and model (--upstream-tls-cert/key)
  client.crt/.key                  a certificate for your own client, if the gateway requires one
  gateway-tokens                   tokens the gateway accepts from clients (--auth-token-file), one a line
  upstream-tokens                  tokens tokenizer and model accept; the gateway presents the first line
                                   (--upstream-auth-token-file)

`make run TLS=1` (python -m llama_grpc_devtools.stack --secrets DIR), deploy/docker-compose.tls.yml and the
Kubernetes component k8s/components/tls all read this layout. For production, let your own CA or
cert-manager issue the certificates; the names and file layout are what matter.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("gateway", "tokenizer", "model")
# In-cluster names: the Services of deploy/k8s and the Compose service names.
DNS_NAMES = {
    "gateway": ["localhost", "gateway", "llama-gateway", "llama-gateway-headless"],
    "tokenizer": ["localhost", "tokenizer", "llama-tokenizer-headless"],
    "model": ["localhost", "model", "llama-model-headless"],
}


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llama-grpc"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "llama-grpc CA", days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str, *,
          dns_names: list[str] = (), ips: list[str] = ("127.0.0.1", "::1"), server: bool = True,
          client: bool = True, days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by ``ca`` for server and/or client authentication."""
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usages = [oid for oid, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client))
              if wanted]
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if server:
        alt = [x509.DNSName(name) for name in dict.fromkeys(dns_names)]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_secrets(directory: str | Path, *, names: list[str] = (), world_readable: bool = False) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_mode = 0o644 if world_readable else 0o600

    def write(name: str, data: bytes, mode: int = 0o644) -> None:
        path = directory / name
        path.write_bytes(data)
        path.chmod(mode)

    ca = make_ca()
    write("ca.crt", cert_pem(ca[0]))
    write("ca.key", key_pem(ca[1]), 0o600)
    leaves = {service: issue(ca, f"llama-{service}", dns_names=[*DNS_NAMES[service], *names]) for service in SERVICES}
    leaves["gateway-client"] = issue(ca, "llama-gateway (client)", server=False)
    leaves["client"] = issue(ca, "llama-grpc client", server=False)
    for name, (cert, key) in leaves.items():
        write(f"{name}.crt", cert_pem(cert))
        write(f"{name}.key", key_pem(key), key_mode)
    write("gateway-tokens", f"{new_token()}\n".encode(), key_mode)
    write("upstream-tokens", f"{new_token()}\n".encode(), key_mode)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/make_secrets.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--names", nargs="*", default=[], help="more DNS names for every server certificate")
    parser.add_argument("--world-readable", action="store_true",
                        help="keys and tokens 0644 (Compose bind-mounts them for the containers' uid 10001)")
    args = parser.parse_args(argv)
    out = write_secrets(args.directory, names=args.names, world_readable=args.world_readable)
    print(f"wrote CA, certificates and tokens to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

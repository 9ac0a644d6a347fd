"""``python -m llama_grpc_runtime.healthcheck --service model``: exit 0 when the server says SERVING.

Container health checks (Docker ``HEALTHCHECK``, Compose, Kubernetes ``exec`` probes under TLS) need a
client that is already in the image; grpc_health_probe is a separate download, this is not. The port
and TLS settings come from the same ``LLAMA_<SERVICE>_*`` variables the server reads, so the check
follows the server when an operator moves its port or turns TLS on; under mutual TLS
(``LLAMA_<SERVICE>_TLS_CLIENT_CA``) it presents the server's own certificate and key. Health needs
no bearer token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from .health import SERVING, health_status, status_name

DEFAULT_PORTS = {"tokenizer": 50051, "model": 50052, "gateway": 50050}


def _channel(args: argparse.Namespace) -> grpc.Channel:
    address = f"{args.host}:{args.port}"
    if not args.tls_cert:
        return grpc.insecure_channel(address)
    # Trust the CA beside the certificate (cert-manager writes ca.crt) or, for a self-signed
    # certificate, the certificate itself.
    ca = Path(args.tls_ca) if args.tls_ca else Path(args.tls_cert).with_name("ca.crt")
    roots = (ca if ca.exists() else Path(args.tls_cert)).read_bytes()
    # Under mutual TLS the check presents the server's own certificate (issued for client use too).
    key, chain = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes()) if args.mutual else (None, None)
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", args.tls_server_name)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_grpc_runtime.healthcheck", description=__doc__)
    parser.add_argument("--service", choices=sorted(DEFAULT_PORTS), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: LLAMA_<SERVICE>_PORT, else the service's port")
    parser.add_argument("--name", default="", help="grpc.health.v1 service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--alive", action="store_true",
                        help="liveness: succeed on any answer, NOT_SERVING included (e.g. a gateway whose upstreams are down)")
    parser.add_argument("--tls-cert", help="the server's certificate: talk TLS (default: LLAMA_<SERVICE>_TLS_CERT)")
    parser.add_argument("--tls-ca", default=os.environ.get("LLAMA_HEALTHCHECK_TLS_CA"),
                        help="CA to verify with (default: ca.crt beside the certificate, else the certificate)")
    parser.add_argument("--tls-server-name", default=os.environ.get("LLAMA_HEALTHCHECK_TLS_SERVER_NAME", "localhost"))
    args = parser.parse_args(argv)
    prefix = f"LLAMA_{args.service.upper()}"
    args.port = args.port or int(os.environ.get(f"{prefix}_PORT") or DEFAULT_PORTS[args.service])
    args.tls_cert = args.tls_cert or os.environ.get(f"{prefix}_TLS_CERT")
    args.tls_key = os.environ.get(f"{prefix}_TLS_KEY")
    args.mutual = bool(os.environ.get(f"{prefix}_TLS_CLIENT_CA") and args.tls_key)
    try:
        with _channel(args) as channel:
            status = health_status(channel, args.name, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.service} {args.host}:{args.port}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return 1
    print(f"{args.service} {args.host}:{args.port}: {status_name(status)}")
    return 0 if args.alive or status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

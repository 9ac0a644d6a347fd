"""Command-line flags that also read from the environment (for containers).

Every flag ``--max-batch-size`` of the model service has the twin ``LLAMA_MODEL_MAX_BATCH_SIZE``;
``--help`` lists both. An explicit flag beats the variable, which beats the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")

# Largest request or response message a server takes by default (--max-message-bytes), and what the
# gateway's channels to its upstreams accept.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServerArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose flags default to ``{env_prefix}_{FLAG}`` environment variables."""

    def __init__(self, *, env_prefix: str, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)
        self.env_prefix = env_prefix

    def add_flag(self, flag: str, *, env: str | None = None, **kwargs: Any) -> argparse.Action:
        """Add ``flag`` with an environment twin (``env`` or the derived name)."""
        env = env or f"{self.env_prefix}_{flag.lstrip('-').upper().replace('-', '_')}"
        if env in os.environ:
            raw = os.environ[env]
            if kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction):
                kwargs["default"] = raw.strip().lower() in {"1", "true", "yes", "on"}
            else:
                convert = kwargs.get("type", str)
                try:
                    kwargs["default"] = convert(raw)
                except (TypeError, ValueError) as exc:
                    self.error(f"environment variable {env}={raw!r} is not valid for {flag}: {exc}")
            kwargs.pop("required", None)
        kwargs["help"] = f"{kwargs.get('help', '')} [env: {env}]".strip()
        return self.add_argument(flag, **kwargs)


@dataclass(frozen=True)
class ServerConfig:
    """What ``server_parser``'s flags say, typed: where and how a server listens (``GrpcServer``)."""

    host: str = "0.0.0.0"
    port: int = 0
    metrics_port: int = 0  # 0: no /metrics
    log_level: str = "info"
    grace_period: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    open_reflection: bool = False
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 1000  # 0: no limit
    stall_timeout: float = 30.0  # 0: none


def from_flags(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """A config dataclass from parsed flags: each field from the flag of the same name, unless given
    in ``values``. Only the entry point sees the Namespace; servers get the typed config."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in values}, **values)


def server_parser(*, service: str, description: str, port: int, metrics_port: int,
                  max_message_bytes: int = MAX_MESSAGE_BYTES) -> ServerArgumentParser:
    """The flags every server takes: where to listen, metrics, logs, shutdown, TLS, tokens, limits."""
    parser = ServerArgumentParser(
        prog=f"python -m {service}_service" if service != "gateway" else "python -m gateway",
        description=description,
        env_prefix=f"LLAMA_{service.upper()}",
    )
    parser.add_flag("--host", default="0.0.0.0", help="address to listen on")
    parser.add_flag("--port", type=int, default=port, help="gRPC port")
    parser.add_flag("--metrics-port", type=int, default=metrics_port,
                    help="Prometheus /metrics port (0: off)")
    parser.add_flag("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    type=str.lower, help="log level")
    parser.add_flag("--grace-period", type=float, default=30.0,
                    help="seconds in-flight calls get to finish after SIGTERM")
    parser.add_flag("--tls-cert", default=None, help="PEM certificate chain: serve TLS instead of plaintext")
    parser.add_flag("--tls-key", default=None, help="PEM private key for --tls-cert")
    parser.add_flag("--tls-client-ca", default=None,
                    help="PEM CA: require a client certificate signed by it (mutual TLS; needs --tls-cert)")
    parser.add_flag("--auth-token-file", default=None,
                    help="file of accepted bearer tokens, one a line (re-read when it changes): callers send "
                         "'authorization: Bearer <token>'; health stays open")
    parser.add_flag("--open-reflection", action="store_true",
                    help="serve reflection without a token (by default it follows --auth-token-file)")
    parser.add_flag("--max-message-bytes", type=int, default=max_message_bytes,
                    help="largest request or response message, in bytes")
    parser.add_flag("--max-concurrent-rpcs", type=int, default=1000,
                    help="calls served at once (health and reflection not counted); beyond: RESOURCE_EXHAUSTED")
    parser.add_flag("--stall-timeout", type=float, default=30.0,
                    help="seconds a stream waits for a client that stops reading before it is ended")
    return parser

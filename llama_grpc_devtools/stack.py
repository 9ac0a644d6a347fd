"""``python -m llama_grpc_devtools.stack``: the whole product in the foreground (``make run``, and the
demo image's default command).

Starts the tokenizer service, the model service and the gateway as child processes on the default
ports, on the embedded default model (or ``--checkpoint`` / ``--tokenizer``), prints their logs
one short line per event, and says how to call the gateway once it serves. Ctrl-C (or SIGTERM)
stops all three; if one of them exits, the others are stopped and the stack exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from llama_grpc_runtime.health import is_serving

from .process import ServiceProcess

GRACE_SECONDS = 30.0
NAMES = ("tokenizer", "model", "gateway")
_LOG_KEYS_SKIPPED = {"event", "level", "timestamp", "service", "logger"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m llama_grpc_devtools.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=env("LLAMA_MODEL_CHECKPOINT") or None,
                        help="model: Meta or Hugging Face Llama directory, or GGUF file (default: the embedded "
                             "SmolLM2-135M-Instruct) [env: LLAMA_MODEL_CHECKPOINT]")
    parser.add_argument("--tokenizer", default=env("LLAMA_TOKENIZER_PATH") or None,
                        help="tokenizer.model, checkpoint directory or GGUF file (default: --checkpoint, or the "
                             "embedded model) [env: LLAMA_TOKENIZER_PATH]")
    parser.add_argument("--host", default="127.0.0.1", help="address the three services listen on")
    parser.add_argument("--base-port", type=int, default=50050,
                        help="gateway port; tokenizer +1, model +2 (default: the standard 50050/50051/50052)")
    parser.add_argument("--metrics-base-port", type=int, default=9090,
                        help="gateway metrics port; tokenizer +1, model +2 (0: metrics off)")
    parser.add_argument("--secrets", default=None, metavar="DIR",
                        help="TLS on every hop, mutual TLS and tokens between the services, a token from clients: "
                             "the files deploy/make_secrets.py writes (`make run TLS=1` makes them in .secrets)")
    parser.add_argument("--raw-logs", action="store_true", help="print the services' JSON log lines as they are")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        args.tokenizer = args.checkpoint
    return args


def compact(line: str) -> str:
    """A JSON log line as ``level event key=value ...``; anything else unchanged."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(event, dict):
        return line
    fields = " ".join(f"{key}={value}" for key, value in event.items() if key not in _LOG_KEYS_SKIPPED)
    return f"{event.get('level', ''):<7} {event.get('event', '')} {fields}".rstrip()


PORT_OFFSETS = {"gateway": 0, "tokenizer": 1, "model": 2}
MODULES = {"tokenizer": "tokenizer_service", "model": "model_service", "gateway": "gateway"}


def service_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each service's flags beyond where it listens (which ``ServiceProcess`` adds)."""
    def secured(name: str) -> list[str]:
        """With --secrets: serve TLS; tokenizer and model require the gateway's client certificate and
        token; the gateway requires a client token and dials them with both."""
        if not args.secrets:
            return []
        path = Path(args.secrets).resolve()
        flags = ["--tls-cert", str(path / f"{name}.crt"), "--tls-key", str(path / f"{name}.key")]
        if name != "gateway":
            return [*flags, "--tls-client-ca", str(path / "ca.crt"), "--auth-token-file", str(path / "upstream-tokens")]
        return [*flags, "--auth-token-file", str(path / "gateway-tokens"), "--upstream-tls-ca", str(path / "ca.crt"),
                "--upstream-tls-cert", str(path / "gateway-client.crt"),
                "--upstream-tls-key", str(path / "gateway-client.key"),
                "--upstream-auth-token-file", str(path / "upstream-tokens")]

    flags = {name: ["--log-level", args.log_level, *secured(name)] for name in NAMES}
    if args.tokenizer:
        flags["tokenizer"] += ["--tokenizer", args.tokenizer]
    if args.checkpoint:
        flags["model"] += ["--checkpoint", args.checkpoint]
    flags["gateway"] += ["--tokenizer-address", f"{args.host}:{args.base_port + PORT_OFFSETS['tokenizer']}",
                         "--model-address", f"{args.host}:{args.base_port + PORT_OFFSETS['model']}"]
    return flags


def start(args: argparse.Namespace) -> dict[str, ServiceProcess]:
    width = max(map(len, NAMES))

    def printer(name: str):  # noqa: ANN202
        return lambda line: print(f"{name:>{width}} | {line if args.raw_logs else compact(line)}", flush=True)

    return {name: ServiceProcess(MODULES[name], *flags, host=args.host, port=args.base_port + PORT_OFFSETS[name],
                                 metrics_port=args.metrics_base_port + PORT_OFFSETS[name] if args.metrics_base_port else 0,
                                 on_line=printer(name), die_with_parent=True)
            for name, flags in service_flags(args).items()}


def serving(address: str, secrets: str | None = None) -> bool:
    if secrets:  # health needs no token, only the CA (the gateway asks for no client certificate)
        credentials = grpc.ssl_channel_credentials(root_certificates=(Path(secrets) / "ca.crt").read_bytes())
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        return is_serving(channel, timeout=1)


def banner(args: argparse.Namespace) -> str:
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    address = f"{host}:{args.base_port}"
    model = Path(args.checkpoint).name if args.checkpoint else "SmolLM2-135M-Instruct (embedded default)"
    client = f"{sys.executable} -m gateway.client"
    try:  # shorter commands when run from the repository, as `make run` does
        client = f"{Path(sys.executable).relative_to(Path.cwd())} -m gateway.client"
    except ValueError:
        pass
    address_flag = "" if address == "localhost:50050" else f" --address {address}"
    metrics = (f" (metrics: http://{host}:{args.metrics_base_port}/metrics)" if args.metrics_base_port else "")
    grpcurl = "grpcurl -plaintext"
    if args.secrets:
        secrets = Path(args.secrets)
        address_flag += f" --tls-ca {secrets / 'ca.crt'} --token-file {secrets / 'gateway-tokens'}"
        grpcurl = (f"grpcurl -cacert {secrets / 'ca.crt'} "
                   f"-H \"authorization: Bearer $(head -1 {secrets / 'gateway-tokens'})\"")
    return "\n".join([
        "",
        f"llama-grpc is serving {model}" + (" (TLS everywhere; tokens required)" if args.secrets else ""),
        f"  gateway   {address}{metrics}",
        f"  tokenizer {host}:{args.base_port + 1}",
        f"  model     {host}:{args.base_port + 2}",
        "Try:",
        f"  {client} chat \"What is the capital of France?\" --temperature 0{address_flag}",
        f"  {client} complete \"I believe the meaning of life is\" --max-new-tokens 48{address_flag}",
        f"  {grpcurl} {address} list",
        f"  {grpcurl} -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}' "
        f"{address} llama.gateway.v1.GatewayService/GenerateStream",
        "Ctrl-C stops all three.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # A Ctrl-C reaches the whole foreground process group: the children get it too and drain.
    children = start(args)
    gateway_address = f"{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{args.base_port}"
    announced = False
    exit_code = 0
    while not stopping.wait(0.2):
        dead = [(name, child) for name, child in children.items() if child.process.poll() is not None]
        if dead:
            name, child = dead[0]
            print(f"\nstack: the {name} service exited with code {child.process.returncode}; stopping the others",
                  file=sys.stderr, flush=True)
            exit_code = 1
            break
        if not announced and serving(gateway_address, args.secrets):
            print(banner(args), flush=True)
            announced = True
    for child in children.values():
        child.terminate()
    deadline = time.monotonic() + GRACE_SECONDS + 5
    codes = {name: child.wait(max(deadline - time.monotonic(), 0.1)) for name, child in children.items()}
    if exit_code == 0 and any(codes.values()):
        exit_code = 1
    print(f"stack: stopped ({', '.join(f'{name} {code}' for name, code in codes.items())})", file=sys.stderr,
          flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

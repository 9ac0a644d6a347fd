"""``python -m gateway``: the public API over the tokenizer and model services.

Start-up waits (health NOT_SERVING) until both upstreams answer SERVING, then checks that they
serve the same model (agreement.py) and exits 1 with the differences when they do not. While
serving, a monitor checks both upstreams every ``--health-interval`` seconds: health is SERVING only
while both are, and an upstream that comes back (maybe restarted with another model) is checked for
agreement again before the gateway reports SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

import structlog

from llama_grpc_runtime.auth import TokenFile
from llama_grpc_runtime.flags import ServerConfig, from_flags, server_parser
from llama_grpc_runtime.logs import configure_logging
from llama_grpc_runtime.server import GrpcServer
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from .completion import CompletionPipeline
from .metrics import gateway_metrics
from .replicas import parse_model_address
from .request import Limits
from .routing import DEFAULT_ROUTING, ROUTING_POLICIES
from .servicer import GatewayServicer
from .state import UpstreamState, agreed_state
from .upstream import DETOKENIZE_MODES, ModelClient, TokenizerClient, UpstreamSecurity, channel_target

log = structlog.get_logger()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = server_parser(service="gateway", port=50050, metrics_port=9090, max_message_bytes=4 * 1024 * 1024,
                           description="llama-grpc gateway: text and chat completion over the tokenizer and "
                                       "model services")
    parser.add_flag("--tokenizer-address", default="localhost:50051", help="tokenizer service host:port")
    parser.add_flag("--model-address", default="localhost:50052",
                    help="model service: host:port, several replicas as host:port,host:port, or "
                         "dns:///name:port (every address of the name is a replica; re-resolved every "
                         "--model-resolve-interval)")
    parser.add_flag("--routing", default=DEFAULT_ROUTING, choices=list(ROUTING_POLICIES),
                    help="how calls are spread over model replicas: prefix sends a prompt to the replica whose "
                         "prefix cache holds the longest part of it (within a load bound), else to the least "
                         "loaded (load as the model service reports it); round_robin takes them in turn")
    parser.add_flag("--model-resolve-interval", type=float, default=5.0,
                    help="seconds between DNS look-ups of dns:/// model addresses (replicas that come and go)")
    parser.add_flag("--max-stop-sequences", type=int, default=16, help="most stop sequences per request")
    parser.add_flag("--max-stop-sequence-chars", type=int, default=256, help="longest stop sequence (characters)")
    parser.add_flag("--max-stop-token-ids", type=int, default=64, help="most stop token ids per request")
    parser.add_flag("--max-messages", type=int, default=256, help="most chat messages per request")
    parser.add_flag("--max-prompt-chars", type=int, default=1_000_000,
                    help="longest prompt, or all messages' roles and content together, in characters")
    parser.add_flag("--max-echo-top-logprobs", type=int, default=65_536,
                    help="with echo: prompt tokens x top_logprobs allowed (each candidate's text is looked up)")
    parser.add_flag("--max-decode-fanout", type=int, default=8,
                    help="Decode calls one request may have in flight to the tokenizer (top-logprob texts)")
    parser.add_flag("--detokenize", default="local", choices=list(DETOKENIZE_MODES),
                    help="where generated tokens become text: local decodes them in the gateway from the vocabulary "
                         "the tokenizer service sends once (GetVocabulary); tokenizer streams them through its "
                         "DecodeStream (two more messages a token)")
    parser.add_flag("--health-interval", type=float, default=1.0, help="seconds between upstream health checks")
    parser.add_flag("--upstream-tls-ca", default=None,
                    help="CA (PEM) of the tokenizer's and model's certificates: dial them over TLS")
    parser.add_flag("--upstream-tls-cert", default=None,
                    help="client certificate (PEM) the gateway presents to its upstreams (mutual TLS)")
    parser.add_flag("--upstream-tls-key", default=None, help="private key (PEM) of --upstream-tls-cert")
    parser.add_flag("--upstream-auth-token-file", default=None,
                    help="file whose first line is the bearer token sent to the upstreams (re-read when it changes)")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's flags, typed (built once, in ``main``)."""

    server: ServerConfig
    tokenizer_address: str
    model_address: str
    limits: Limits  # what requests may ask for; the served model's limits are added by agreement
    health_interval: float
    routing: str
    model_resolve_interval: float
    max_decode_fanout: int
    detokenize: str
    security: UpstreamSecurity

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GatewayConfig:
        token_file = TokenFile(args.upstream_auth_token_file) if args.upstream_auth_token_file else None
        return from_flags(
            cls, args, server=from_flags(ServerConfig, args),
            limits=from_flags(Limits, args, vocab_size=0, max_seq_len=0),
            security=UpstreamSecurity(tls_ca=args.upstream_tls_ca, tls_cert=args.upstream_tls_cert,
                                      tls_key=args.upstream_tls_key, token_file=token_file))


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.tokenizer = TokenizerClient(config.tokenizer_address, config.security,
                                         max_decode_fanout=config.max_decode_fanout,
                                         detokenize=config.detokenize)
        self.model = ModelClient(config.model_address, config.security, routing=config.routing,
                                 health_interval=config.health_interval,
                                 resolve_interval=config.model_resolve_interval)
        self.base_limits = config.limits
        # Replaced whole by the health monitor; each request reads it once.
        self.state = UpstreamState(self.base_limits)
        self.pipeline = CompletionPipeline(self.tokenizer, self.model, lambda: self.state)
        self.servicer = GatewayServicer(self.pipeline, lambda: self.state)
        self.server = GrpcServer("gateway", config.server)
        self.server.add(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, self.servicer,
                        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name)
        self._monitor: asyncio.Task | None = None

    async def _health(self) -> tuple[bool, bool]:
        tokenizer_ok, model_ok = await asyncio.gather(self.tokenizer.healthy(), self.model.healthy())
        gateway_metrics().upstream_up.labels("tokenizer").set(tokenizer_ok)
        gateway_metrics().upstream_up.labels("model").set(model_ok)
        return tokenizer_ok, model_ok

    async def agree(self) -> UpstreamState:
        """Ask both upstreams what they serve: the state to swap in (with a refusal when they disagree)."""
        tokenizer_info, model_info = await asyncio.gather(self.tokenizer.info(), self.model.info())
        state = agreed_state(self.state, self.base_limits, tokenizer_info, self.tokenizer.address,
                             model_info, self.model.address)
        if not state.refusal:
            log.info("upstreams agree", tokenizer=tokenizer_info.name, model=model_info.model_name,
                     vocab_size=tokenizer_info.vocab_size, model_vocab_size=model_info.vocab_size,
                     max_seq_len=model_info.max_seq_len, stop_token_ids=list(model_info.stop_token_ids),
                     extra_stop_token_ids=list(state.extra_stop_token_ids), add_bos=state.add_bos)
        return state

    async def startup(self) -> None:
        next_log = 0.0
        while (health := await self._health()) != (True, True):
            if time.monotonic() >= next_log:  # say what we wait for, every 10 s
                down = [f"{u.name} at {u.address}" for u, ok in zip((self.tokenizer, self.model), health,
                                                                    strict=True) if not ok]
                log.info("waiting for upstreams", waiting_for=down)
                next_log = time.monotonic() + 10
            await asyncio.sleep(self.config.health_interval)
        self.state = await self.agree()
        if self.state.refusal:
            print(f"gateway: refusing to start: {self.state.refusal}", file=sys.stderr, flush=True)
            raise RuntimeError(self.state.refusal)
        self._monitor = asyncio.create_task(self.monitor())

    async def monitor(self) -> None:
        """Keep health in step with the upstreams; re-check agreement when one comes back."""
        was_up = (True, True)
        while True:
            await asyncio.sleep(self.config.health_interval)
            up = await self._health()
            if up != was_up:
                log.warning("upstream health changed", tokenizer_serving=up[0], model_serving=up[1])
            if all(up) and (not all(was_up) or self.state.refusal):
                try:
                    self.state = await self.agree()
                except Exception as error:  # noqa: BLE001 -- went down again meanwhile: retry next round
                    log.warning("agreement check failed", error=str(error))
                    up = (False, False)
                if self.state.refusal:
                    log.error("upstreams disagree; not serving", reason=self.state.refusal)
            await self.server.set_serving(all(up) and not self.state.refusal)
            was_up = up

    async def drain(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()

    async def run(self) -> int:
        try:
            return await self.server.run(startup=self.startup, drain=self.drain)
        finally:
            await asyncio.gather(self.tokenizer.close(), self.model.close())


async def serve(config: GatewayConfig) -> int:
    # grpc.aio binds a server and its channels to the running event loop: create them inside it.
    return await Gateway(config).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("gateway", args.log_level)
    try:
        channel_target(args.tokenizer_address)
        parse_model_address(args.model_address)
    except (ValueError, OSError) as error:
        print(f"gateway: bad upstream address: {error}", file=sys.stderr)
        return 2
    try:
        config = GatewayConfig.from_args(args)
        config.security.credentials()
    except (ValueError, OSError) as error:
        print(f"gateway: bad upstream TLS or token settings: {error}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())

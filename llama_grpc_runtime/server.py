"""One way to run a grpc.aio server: health, reflection, request ids, metrics, errors, SIGTERM.

    async def main() -> int:  # the grpc.aio server must be made inside the running event loop
        server = GrpcServer("tokenizer", from_flags(ServerConfig, args))
        server.add(tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, servicer,
                   tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name)
        return await server.run(startup=load)

    sys.exit(asyncio.run(main()))

Health is NOT_SERVING until ``startup`` returns and again from the moment SIGTERM arrives; in-flight
calls then get ``--grace-period`` seconds before they are cancelled, and the process exits 0.

Every call but health (always open, for probes) passes, in order: the bearer token
(``--auth-token-file``; reflection too unless ``--open-reflection``) -> UNAUTHENTICATED; the
concurrency limit (``--max-concurrent-rpcs``) -> RESOURCE_EXHAUSTED; a request that is not valid
protobuf -> INVALID_ARGUMENT. A response stream whose client stops reading for ``--stall-timeout``
seconds is ended. TLS (``--tls-cert``/``--tls-key``) and mutual TLS (``--tls-client-ca``) are set up
at bind time; a port already in use stops the server with a message (SO_REUSEPORT is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .auth import TokenFile, check_bearer
from .context import REQUEST_ID_HEADER, new_request_id, reset_request_id, set_request_id
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    short,
    status_of,
)
from .flags import MAX_MESSAGE_BYTES, ServerConfig
from .metrics import request_metrics, serve_metrics
from .reflection import enable_server_reflection

log = structlog.get_logger()

# Request ids are echoed into logs and headers: keep them short and printable.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_HEALTH = "/grpc.health.v1."
_REFLECTION = "/grpc.reflection."


class _Policy:
    """What the interceptor enforces, from the server's flags."""

    def __init__(self, config: ServerConfig) -> None:
        path = config.auth_token_file
        try:
            self.tokens = TokenFile(path) if path else None
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--auth-token-file: {exc}") from None
        self.open_reflection = config.open_reflection
        self.max_concurrent_rpcs = config.max_concurrent_rpcs
        self.stall_timeout = config.stall_timeout or None
        self.in_flight = 0
        self.draining = False  # set on SIGTERM: new calls are refused, running ones finish

    def refusal(self, metadata: Any) -> str | None:
        """Why this call's credentials are refused (None: accepted, or no tokens required)."""
        if self.tokens is None:
            return None
        return check_bearer(metadata, self.tokens.tokens())


class _Unparseable:
    """What the deserializer hands on for bytes that are not the expected message."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error

    def refuse(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid {self.message_type} protobuf message "
                               f"({short(str(self.error) or type(self.error).__name__, 100)})")


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that turns a parse error into an ``_Unparseable`` (answered INVALID_ARGUMENT
    by the handler) instead of letting gRPC answer UNKNOWN."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    message_type = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 -- DecodeError and whatever a broken message raises
            return _Unparseable(message_type, exc)

    return parse


async def _parsed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Unparseable):
            raise request.refuse()
        yield request


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return new_request_id()


class _Call:
    """Bookkeeping shared by the four handler shapes: request id, logs, metrics, status mapping, and
    the checks every call passes (``admit``)."""

    def __init__(self, prefix: str, method: str, context: grpc.aio.ServicerContext, policy: _Policy) -> None:
        self.method = method.rsplit("/", 1)[-1]
        self.context = context
        self.metrics = request_metrics(prefix)
        self.code = grpc.StatusCode.OK
        self.policy = policy
        self._admitted = False

    def admit(self, request: Any = None) -> None:
        """Token, then concurrency, then the request's own bytes; raises the refusal."""
        refusal = self.policy.refusal(self.context.invocation_metadata())
        if refusal is not None:
            raise Unauthenticated(refusal)
        if self.policy.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        limit = self.policy.max_concurrent_rpcs
        if limit and self.policy.in_flight >= limit:
            raise ResourceExhausted(f"the server is at its limit of {limit} concurrent calls "
                                    "(--max-concurrent-rpcs); retry later")
        self.policy.in_flight += 1
        self._admitted = True
        if isinstance(request, _Unparseable):
            raise request.refuse()

    async def __aenter__(self) -> _Call:
        request_id = _request_id(self.context)
        self._token = set_request_id(request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id, method=self.method)
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        self.metrics.in_flight.labels(self.method).inc()
        self._start = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._admitted:
            self.policy.in_flight -= 1
        try:
            if exc is None:
                return False
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                self.code = grpc.StatusCode.CANCELLED
                log.info("request cancelled")
                return False
            if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted with its own status
                self.code = self.context.code() or grpc.StatusCode.UNKNOWN
                return False
            self.code, message = status_of(exc)
            if self.code == grpc.StatusCode.INTERNAL:
                log.exception("request failed", error=repr(exc))
            else:
                log.info("request refused", code=self.code.name, reason=message)
            await self.context.abort(self.code, message)  # raises AbortError: the call ends here
        finally:
            elapsed = time.perf_counter() - self._start
            self.metrics.requests.labels(self.method, self.code.name).inc()
            self.metrics.latency.labels(self.method).observe(elapsed)
            self.metrics.in_flight.labels(self.method).dec()
            log.info("request done", code=self.code.name, seconds=round(elapsed, 4))  # the access log
            structlog.contextvars.unbind_contextvars("request_id", "method")
            reset_request_id(self._token)
        return False


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED (for reflection)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    return grpc.unary_unary_rpc_method_handler(refuse, **codec)


class _Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, prefix: str, policy: _Policy) -> None:
        self.prefix = prefix
        self.policy = policy

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH):
            return handler
        if details.method.startswith(_REFLECTION):
            refusal = None if self.policy.open_reflection else self.policy.refusal(details.invocation_metadata)
            return handler if refusal is None else _refusing(handler, refusal)
        prefix, method, policy = self.prefix, details.method, self.policy
        codec = {"request_deserializer": _lenient(handler.request_deserializer),
                 "response_serializer": handler.response_serializer}
        streaming_requests = handler.request_streaming

        if handler.response_streaming:
            behavior = handler.stream_stream if streaming_requests else handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with _Call(prefix, method, context, policy) as call:
                    call.admit(None if streaming_requests else request)
                    responses = behavior(_parsed(request) if streaming_requests else request, context)
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            await _write(context, response, policy.stall_timeout)

            wrap = grpc.stream_stream_rpc_method_handler if streaming_requests \
                else grpc.unary_stream_rpc_method_handler
            return wrap(stream, **codec)

        behavior = handler.stream_unary if streaming_requests else handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(prefix, method, context, policy) as call:
                call.admit(None if streaming_requests else request)
                return await behavior(_parsed(request) if streaming_requests else request, context)

        wrap = grpc.stream_unary_rpc_method_handler if streaming_requests \
            else grpc.unary_unary_rpc_method_handler
        return wrap(unary, **codec)


async def _write(context: grpc.aio.ServicerContext, response: Any, stall_timeout: float | None) -> None:
    """Send one stream message; a client that reads nothing for ``stall_timeout`` seconds (its flow
    control window stays full) loses the stream instead of holding the server's resources forever."""
    try:
        async with asyncio.timeout(stall_timeout):  # a timer, not a task per message as wait_for makes
            await context.write(response)
    except TimeoutError:
        raise DeadlineExceeded(f"the client read nothing for {stall_timeout:g} s (--stall-timeout); "
                               "the stream is ended") from None


class GrpcServer:
    """A grpc.aio server with the plumbing every llama-grpc service shares."""

    def __init__(self, service: str, config: ServerConfig, *, metrics_prefix: str | None = None) -> None:
        self.service = service
        self.config = config
        self.metrics_prefix = metrics_prefix or f"llama_{service}"
        self.policy = _Policy(config)
        max_message_bytes = config.max_message_bytes or MAX_MESSAGE_BYTES
        self.server = grpc.aio.server(
            interceptors=[_Interceptor(self.metrics_prefix, self.policy)],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # gRPC sets SO_REUSEPORT by default: a second server on the same port would then start
                # silently and take a share of the first one's connections. Fail to bind instead.
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # Clients re-resolve DNS only when a connection closes: recycling connections (running
                # streams finish; the grace is unlimited) lets a scaled-up replica start taking calls.
                ("grpc.max_connection_age_ms", 60_000),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self._stopping = asyncio.Event()
        self.exit_code = 0
        self.port = 0

    def add(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        add_to_server(servicer, self.server)
        self.service_names.append(full_name)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    def shutdown(self, exit_code: int = 0) -> None:
        """Begin the drain from inside the process (e.g. a fatal error), exiting with ``exit_code``."""
        self.exit_code = max(self.exit_code, exit_code)
        self._stopping.set()

    def _credentials(self) -> grpc.ServerCredentials | None:
        cert, key, client_ca = self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise SystemExit("--tls-cert and --tls-key go together" + (" (--tls-client-ca needs both)" if client_ca else ""))
        try:
            return grpc.ssl_server_credentials(
                [(Path(key).read_bytes(), Path(cert).read_bytes())],
                root_certificates=Path(client_ca).read_bytes() if client_ca else None,
                require_client_auth=bool(client_ca))
        except OSError as exc:
            raise SystemExit(f"TLS files: {exc}") from None

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        credentials = self._credentials()
        try:
            port = (self.server.add_secure_port(address, credentials) if credentials
                    else self.server.add_insecure_port(address))
        except RuntimeError as exc:  # grpc raises "Failed to bind to address ..."
            port, reason = 0, str(exc)
        else:
            reason = "gRPC could not bind it"
        if port == 0:
            raise SystemExit(f"{self.service}: cannot listen on {address} ({reason}): is another server using "
                             "the port? Stop it or choose another --port.")
        return port

    async def run(
        self,
        startup: Callable[[], Awaitable[None]] | None = None,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Serve until SIGTERM/SIGINT (or ``shutdown()``); return the process exit code.

        ``startup`` runs after the port is open (health says NOT_SERVING meanwhile); ``drain`` runs
        when shutdown begins, before in-flight calls get their grace period.
        """
        # grpc.reflection.v1 and v1alpha (reflection.py): newer clients ask v1 first.
        enable_server_reflection(
            (*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.server)
        await self.set_serving(False)
        self.port = self._bind()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        serve_metrics(self.config.host, self.config.metrics_port)
        await self.server.start()
        log.info("listening", port=self.port, metrics_port=self.config.metrics_port, services=self.service_names,
                 tls=bool(self.config.tls_cert), mutual_tls=bool(self.config.tls_client_ca),
                 tokens_required=self.policy.tokens is not None)
        if startup is not None:
            startup_task = asyncio.ensure_future(startup())
            stop_task = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({startup_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            if not startup_task.done():
                startup_task.cancel()
            elif startup_task.exception() is not None:
                log.error("startup failed", error=str(startup_task.exception()),
                          exc_info=startup_task.exception())
                self.exit_code = 1
                self._stopping.set()
        if not self._stopping.is_set():
            await self.set_serving(True)
            log.info("serving", port=self.port)
        await self._stopping.wait()
        log.info("draining", grace_period=self.config.grace_period)
        await self.health.enter_graceful_shutdown()
        self.policy.draining = True
        if drain is not None:
            await drain()
        # Running calls finish before the server stops: grpc.aio's stop() would cancel a handler
        # that is itself waiting on a client call (the gateway's upstream streams) at once.
        deadline = time.monotonic() + self.config.grace_period
        while self.policy.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

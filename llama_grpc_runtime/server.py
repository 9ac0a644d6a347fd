"""One way to run a grpc.aio server: health, reflection, request ids, metrics, errors, SIGTERM.

    async def main() -> int:  # the grpc.aio server must be made inside the running event loop
        server = GrpcServer("tokenizer", args)
        server.add(tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, servicer,
                   tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name)
        return await server.run(startup=load)

    sys.exit(asyncio.run(main()))

Health is NOT_SERVING until ``startup`` returns and again from the moment SIGTERM arrives; in-flight
calls then get ``--grace-period`` seconds before they are cancelled, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .context import REQUEST_ID_HEADER, new_request_id, reset_request_id, set_request_id
from .errors import status_of
from .metrics import request_metrics, serve_metrics

log = structlog.get_logger()

# Request ids are echoed into logs and headers: keep them short and printable.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_UNWRAPPED = ("/grpc.health.v1.", "/grpc.reflection.")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return new_request_id()


class _Call:
    """Bookkeeping shared by the four handler shapes: request id, logs, metrics, status mapping."""

    def __init__(self, prefix: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method.rsplit("/", 1)[-1]
        self.context = context
        self.metrics = request_metrics(prefix)
        self.code = grpc.StatusCode.OK

    async def __aenter__(self) -> _Call:
        request_id = _request_id(self.context)
        self._token = set_request_id(request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id, method=self.method)
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        self.metrics.in_flight.labels(self.method).inc()
        self._start = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
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


class _Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNWRAPPED):
            return handler
        prefix, method = self.prefix, details.method
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}

        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with _Call(prefix, method, context):
                    async for response in behavior(request, context):
                        yield response

            wrap = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
            return wrap(stream, **codec)

        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(prefix, method, context):
                return await behavior(request, context)

        wrap = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
            else grpc.unary_unary_rpc_method_handler
        return wrap(unary, **codec)


class GrpcServer:
    """A grpc.aio server with the plumbing every llama-grpc service shares."""

    def __init__(self, service: str, args: Any, *, metrics_prefix: str | None = None) -> None:
        self.service = service
        self.args = args
        self.metrics_prefix = metrics_prefix or f"llama_{service}"
        self.server = grpc.aio.server(
            interceptors=[_Interceptor(self.metrics_prefix)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
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

    def _bind(self) -> int:
        address = f"{self.args.host}:{self.args.port}"
        if self.args.tls_cert or self.args.tls_key:
            if not (self.args.tls_cert and self.args.tls_key):
                raise SystemExit("--tls-cert and --tls-key go together")
            credentials = grpc.ssl_server_credentials(
                [(Path(self.args.tls_key).read_bytes(), Path(self.args.tls_cert).read_bytes())])
            return self.server.add_secure_port(address, credentials)
        return self.server.add_insecure_port(address)

    async def run(
        self,
        startup: Callable[[], Awaitable[None]] | None = None,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Serve until SIGTERM/SIGINT (or ``shutdown()``); return the process exit code.

        ``startup`` runs after the port is open (health says NOT_SERVING meanwhile); ``drain`` runs
        when shutdown begins, before in-flight calls get their grace period.
        """
        reflection.enable_server_reflection(
            (*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        await self.set_serving(False)
        self.port = self._bind()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        serve_metrics(self.args.host, self.args.metrics_port)
        await self.server.start()
        log.info("listening", port=self.port, metrics_port=self.args.metrics_port,
                 services=self.service_names)
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
        log.info("draining", grace_period=self.args.grace_period)
        await self.health.enter_graceful_shutdown()
        if drain is not None:
            await drain()
        await self.server.stop(self.args.grace_period)
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

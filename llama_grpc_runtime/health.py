"""Asking a server for its ``grpc.health.v1`` status: the one probe every caller uses (the container
health check, the gateway's upstream monitor, the stack launcher, the tests' process helper)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 1.0) -> int:
    """The server's status for ``service`` ('' = the whole server); raises ``grpc.RpcError`` when it
    does not answer."""
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


async def health_status_async(channel: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return (await health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)).status


def is_serving(channel: grpc.Channel, service: str = "", timeout: float = 1.0) -> bool:
    """SERVING now; False for any other answer or none."""
    try:
        return health_status(channel, service, timeout) == SERVING
    except grpc.RpcError:
        return False


async def is_serving_async(channel: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> bool:
    try:
        return await health_status_async(channel, service, timeout) == SERVING
    except grpc.RpcError:
        return False

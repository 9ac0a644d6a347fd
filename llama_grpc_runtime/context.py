"""The request id of the call being served, for logs and for upstream calls."""

from __future__ import annotations

import contextvars
import uuid

REQUEST_ID_HEADER = "x-request-id"
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token[str]:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str]) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # a stream finalised outside the context that served it (cancel at shutdown)
        pass


def new_request_id() -> str:
    return uuid.uuid4().hex


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that carries the current request id to an upstream call."""
    request_id = current_request_id()
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()

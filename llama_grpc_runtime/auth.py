"""Bearer tokens: the files that hold them, and the check every server makes.

A token file holds one accepted token a line (blank lines and ``#`` comments ignored). It is read
again whenever it changes on disk (modification time, size or inode: a Kubernetes Secret update
swaps a symlink), so tokens rotate without a restart: add the new line, move clients over, remove
the old one. Callers send ``authorization: Bearer <token>``. Tokens are compared in constant time
(``hmac.compare_digest``, against every accepted token), never logged and never echoed.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Iterable
from pathlib import Path

AUTHORIZATION_HEADER = "authorization"
_SCHEME = "bearer "


class TokenFile:
    """The tokens in a file, re-read when the file changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: tuple[bytes, ...] = ()
        self.tokens()  # a missing or empty file stops start-up, not the first call
        if not self._tokens:
            raise ValueError(f"{self.path} holds no token (one token a line)")

    def _read(self) -> tuple[bytes, ...]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))

    def tokens(self) -> tuple[bytes, ...]:
        """The accepted tokens now; the last good set if the file is briefly missing or empty."""
        try:
            stat = os.stat(self.path)
        except OSError:
            if self._stamp is None:
                raise
            return self._tokens
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    tokens = self._read()
                    if tokens or self._stamp is None:
                        self._tokens = tokens
                    self._stamp = stamp
        return self._tokens

    def first(self) -> str:
        """The token a client presents: the file's first."""
        return self.tokens()[0].decode()


def bearer(token: str) -> tuple[str, str]:
    """The metadata pair a client sends."""
    return AUTHORIZATION_HEADER, f"Bearer {token}"


def check_bearer(metadata: Iterable[tuple[str, str | bytes]] | None, accepted: Iterable[bytes]) -> str | None:
    """None when ``metadata`` carries an accepted bearer token, else why not (without the token)."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION_HEADER]
    if not values:
        return "missing bearer token: send metadata 'authorization: Bearer <token>'"
    if len(values) > 1:
        return "more than one authorization header"
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    if not value.lower().startswith(_SCHEME) or not value[len(_SCHEME):].strip():
        return "authorization metadata is not of the form 'Bearer <token>'"
    presented = value[len(_SCHEME):].strip().encode("utf-8", "surrogateescape")
    matched = False
    for token in accepted:  # every comparison runs: the time says nothing about which token is close
        matched |= hmac.compare_digest(presented, token)
    return None if matched else "the bearer token is not accepted"

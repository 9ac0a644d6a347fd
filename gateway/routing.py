"""Which model replica gets a request: ``--routing round_robin`` or ``--routing prefix``.

Plain Python, no I/O: the policies see each replica as a ``ReplicaView`` (its load and room, as
``replicas.py`` measures them from the model service's own reports) and return the one to call.

``prefix`` (the default) sends a request to the replica that already holds the longest prefix of its
prompt in its prefix cache, so that replica computes only the rest:

- A prompt is cut into blocks of the model's ``kv_block_size`` tokens; block i is named by a hash of
  its tokens and of every block before it (``model_service.scheduler.block_keys``: the very names
  the model service's prefix cache gives them), so two prompts share block i's name exactly when
  they share their first i+1 blocks.
- ``PrefixIndex`` remembers, per replica, the block hashes of the prompts sent there, least
  recently used first out, at most as many as the replica's KV cache has blocks (it cannot hold more).
- The replica with the longest run of remembered leading blocks wins when that run covers more than
  half of the prompt's blocks (``MIN_MATCH_FRACTION``; a shared chat-template header alone is not worth
  skewing the load for) and its load stays within the bound below.
- Otherwise, and when the holder is too busy, the least loaded replica (ties taken in turn, so
  unrelated prompts, and the first request of each family, spread over the replicas).

Bounded imbalance (consistent hashing with bounded loads, Mirrokni et al.): a replica takes a request
for its cached prefix only while its load plus the request stays within
``max(least load + n + slack, ceil(factor x (total load + n) / replicas))``. A hot prefix therefore
spills to other replicas instead of queueing behind itself.

``round_robin`` takes the replicas in turn. Both skip replicas that have no room for the request
while another has some.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROUTING_POLICIES = ("prefix", "round_robin")
DEFAULT_ROUTING = "prefix"
MIN_MATCH_FRACTION = 0.5  # of the prompt's full blocks, for the cached prefix to decide the replica


@dataclass(frozen=True)
class Balance:
    """How far ``prefix`` routing may load a replica beyond the others for the sake of its cache."""

    factor: float = 1.25  # times the mean load (after this request)
    slack: int = 2  # sequences above the least loaded replica that are always allowed


@dataclass(frozen=True)
class ReplicaView:
    """One replica as a policy sees it."""

    key: str  # its address
    load: int  # sequences running or queued there (the model's report, plus this gateway's calls since)
    room: int  # sequences it may still take before it refuses (capacity - load)
    matched_blocks: int = 0  # leading blocks of this prompt its prefix cache holds (prefix routing)


@dataclass(frozen=True)
class Route:
    key: str
    reason: str  # "prefix", "least_loaded" or "round_robin": why this replica
    matched_blocks: int = 0


class PrefixIndex:
    """Per replica, the block hashes of prompts routed there (LRU, bounded per replica)."""

    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[bytes, None]] = {}
        self._limits: dict[str, int] = {}

    def set_limit(self, key: str, blocks: int) -> None:
        """At most ``blocks`` remembered for ``key`` (its KV cache's size in blocks)."""
        self._limits[key] = max(blocks, 0)
        self._trim(key)

    def remember(self, key: str, hashes: Sequence[bytes]) -> None:
        blocks = self._blocks.setdefault(key, OrderedDict())
        for block in hashes:
            blocks[block] = None
            blocks.move_to_end(block)
        self._trim(key)

    def forget(self, key: str) -> None:
        """The replica's cache is gone (it restarted, or left)."""
        self._blocks.pop(key, None)

    def matched_blocks(self, key: str, hashes: Sequence[bytes]) -> int:
        blocks = self._blocks.get(key)
        if not blocks:
            return 0
        matched = 0
        for block in hashes:
            if block not in blocks:
                break
            matched += 1
        return matched

    def cached_blocks(self, key: str) -> int:
        return len(self._blocks.get(key, ()))

    def _trim(self, key: str) -> None:
        blocks, limit = self._blocks.get(key), self._limits.get(key)
        if blocks is None or limit is None:
            return
        while len(blocks) > limit:
            blocks.popitem(last=False)


def with_room(replicas: Sequence[ReplicaView], n: int) -> list[ReplicaView]:
    """The replicas that can take ``n`` more sequences; all of them when none can (the model decides)."""
    return [r for r in replicas if r.room >= n] or list(replicas)


def load_bound(replicas: Sequence[ReplicaView], n: int, balance: Balance) -> int:
    """The most load (after taking ``n``) a replica may have when chosen for its cache."""
    least = min(r.load for r in replicas)
    mean_after = (sum(r.load for r in replicas) + n) / len(replicas)
    return max(least + n + balance.slack, math.ceil(balance.factor * mean_after))


def least_loaded(replicas: Sequence[ReplicaView], turn: int = 0) -> ReplicaView:
    """Least load; ties taken in turn (``turn`` counts the calls so far)."""
    least = min(r.load for r in replicas)
    ties = [r for r in replicas if r.load == least]
    return ties[turn % len(ties)]


def route_prefix(replicas: Sequence[ReplicaView], prompt_blocks: int, n: int = 1,
                 balance: Balance = Balance(), turn: int = 0) -> Route:
    """``--routing prefix``: the longest cached prefix within the load bound, else the least loaded."""
    if not replicas:
        raise ValueError("no replica to route to")
    candidates = with_room(replicas, n)
    bound = load_bound(candidates, n, balance)
    holders = [r for r in candidates if r.matched_blocks > 0 and r.load + n <= bound
               and r.matched_blocks > MIN_MATCH_FRACTION * prompt_blocks]
    if holders:
        best = max(holders, key=lambda r: (r.matched_blocks, -r.load))
        return Route(best.key, "prefix", best.matched_blocks)
    return Route(least_loaded(candidates, turn).key, "least_loaded")


def route_round_robin(replicas: Sequence[ReplicaView], turn: int, n: int = 1) -> Route:
    """``--routing round_robin``: the replicas in turn (``turn`` counts the calls so far)."""
    if not replicas:
        raise ValueError("no replica to route to")
    candidates = with_room(replicas, n)
    return Route(candidates[turn % len(candidates)].key, "round_robin")

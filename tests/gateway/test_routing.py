"""The routing policies (gateway/routing.py) as pure functions, and admission over replica state
(gateway/replicas.py) without any server: properties checked with hypothesis."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.replicas import ReplicaAddress, ReplicaSet, parse_model_address, resolve
from gateway.routing import (
    MIN_MATCH_FRACTION,
    Balance,
    PrefixIndex,
    ReplicaView,
    load_bound,
    route_prefix,
    route_round_robin,
)
from llama_grpc_runtime.errors import ResourceExhausted
from llama_grpc_stubs.model.v1 import model_pb2
from model_service.scheduler import block_keys

# ---- block hashes and the index ------------------------------------------------------------


@given(st.lists(st.integers(0, 50_000), max_size=80), st.lists(st.integers(0, 50_000), max_size=80),
       st.integers(1, 16))
def test_block_hashes_agree_exactly_on_shared_whole_blocks(a: list[int], b: list[int], block_size: int):
    ha, hb = block_keys(a, block_size), block_keys(b, block_size)
    assert len(ha) == len(a) // block_size
    for i in range(min(len(ha), len(hb))):
        same_prefix = a[:(i + 1) * block_size] == b[:(i + 1) * block_size]
        assert (ha[i] == hb[i]) == same_prefix


def test_block_hashes_do_not_depend_on_the_process():
    # Python hashes ints and tuples of ints without PYTHONHASHSEED: every gateway names blocks alike.
    assert block_keys(list(range(8)), 4) == block_keys(list(range(8)), 4)
    assert block_keys([1, 2, 3], 4) == []


def test_index_matches_the_longest_remembered_prefix_and_forgets_least_recent_first():
    index = PrefixIndex()
    index.set_limit("a", 3)
    family = block_keys(list(range(64)), 16)  # 4 blocks
    index.remember("a", family[:2])
    assert index.matched_blocks("a", family) == 2
    assert index.matched_blocks("b", family) == 0
    index.remember("a", block_keys([7] * 32, 16))  # 2 more: the oldest block goes
    assert index.cached_blocks("a") == 3
    assert index.matched_blocks("a", family) == 0  # its first block was the least recently used
    index.forget("a")
    assert index.cached_blocks("a") == 0


# ---- policies ------------------------------------------------------------------------------

views = st.lists(st.builds(ReplicaView, key=st.text("abcdef", min_size=1, max_size=3), load=st.integers(0, 40),
                           room=st.integers(-5, 40), matched_blocks=st.integers(0, 12)),
                 min_size=1, max_size=6, unique_by=lambda v: v.key)


@settings(max_examples=300, deadline=None)
@given(views, st.integers(0, 12), st.integers(1, 4), st.floats(1.0, 2.0), st.integers(0, 4), st.integers(0, 9))
def test_prefix_routing_bounds_the_imbalance(replicas, prompt_blocks, n, factor, slack, turn):
    """Whatever the cache says, the chosen replica is the least loaded of those with room, or its
    load after this request stays within max(least + n + slack, ceil(factor x mean after))."""
    balance = Balance(factor, slack)
    route = route_prefix(replicas, prompt_blocks, n, balance, turn)
    candidates = [r for r in replicas if r.room >= n] or replicas
    chosen = next(r for r in replicas if r.key == route.key)
    assert chosen in candidates
    least = min(r.load for r in candidates)
    if route.reason == "prefix":
        assert chosen.load + n <= load_bound(candidates, n, balance)
        assert chosen.load + n <= max(least + n + slack,
                                      math.ceil(factor * (sum(r.load for r in candidates) + n) / len(candidates)))
        assert chosen.matched_blocks > MIN_MATCH_FRACTION * prompt_blocks
        # and no other eligible holder has a longer match
        assert all(r.matched_blocks <= chosen.matched_blocks for r in candidates
                   if r.load + n <= load_bound(candidates, n, balance))
    else:
        assert chosen.load == least


def test_prefix_routing_follows_the_cache_then_spills_when_the_holder_is_busy():
    idle = [ReplicaView("a", 0, 10, matched_blocks=8), ReplicaView("b", 0, 10)]
    assert route_prefix(idle, 10).key == "a"
    assert route_prefix(idle, 10).reason == "prefix"
    busy = [ReplicaView("a", 6, 4, matched_blocks=8), ReplicaView("b", 0, 10)]  # bound: max(0+1+2, ceil(1.25*3.5))
    assert route_prefix(busy, 10) == route_prefix(busy, 10)  # a pure function
    assert route_prefix(busy, 10).key == "b"
    full = [ReplicaView("a", 2, 0, matched_blocks=8), ReplicaView("b", 2, 3)]
    assert route_prefix(full, 10).key == "b"  # no room on the holder


def test_a_short_shared_header_does_not_decide():
    # 1 of 4 blocks in common (a chat template's opening) is not worth skewing the load for.
    replicas = [ReplicaView("a", 1, 10, matched_blocks=1), ReplicaView("b", 1, 10), ReplicaView("c", 2, 10)]
    routes = [route_prefix(replicas, 4, turn=turn) for turn in range(4)]
    assert {route.reason for route in routes} == {"least_loaded"}
    assert [route.key for route in routes] == ["a", "b", "a", "b"]  # ties on load taken in turn


def test_round_robin_takes_turns_among_replicas_with_room():
    replicas = [ReplicaView("a", 0, 5), ReplicaView("b", 0, 5), ReplicaView("c", 9, 0)]
    assert [route_round_robin(replicas, turn).key for turn in range(4)] == ["a", "b", "a", "b"]
    assert route_round_robin(replicas[2:], 0).key == "c"  # none has room: the model decides


def test_no_replica_is_an_error():
    with pytest.raises(ValueError):
        route_prefix([], 1)


# ---- admission over replica state ----------------------------------------------------------


def admit(replicas: ReplicaSet, n: int):  # noqa: ANN201
    return asyncio.run(replicas.admit(n))


class NoChannel:
    """Enough of a channel for a stub to be built; admission makes no calls."""

    def __getattr__(self, name: str):  # noqa: ANN204
        return lambda *args, **kwargs: None


def replica_set(*capacities: int, routing: str = "prefix") -> ReplicaSet:
    addresses = ",".join(f"127.0.0.1:{port}" for port in range(1, len(capacities) + 1))
    replicas = ReplicaSet(addresses, lambda address, name: NoChannel(), routing=routing)
    for replica, capacity in zip(replicas.replicas.values(), capacities, strict=True):
        replica.serving = True
        replica.info = model_pb2.GetModelInfoResponse(max_batch_size=capacity, max_queue=0, kv_block_size=4,
                                                      kv_cache_tokens=4096, prefix_cache=True)
    return replicas


@given(st.integers(1, 12), st.lists(st.integers(1, 4), min_size=1, max_size=30))
def test_admission_with_one_gateway_takes_exactly_what_the_model_service_would(capacity, ns):
    """One replica, nothing else calling it: a request is admitted exactly when its n sequences fit
    beside those already admitted (the model service's own rule: live + n <= capacity)."""
    replicas = replica_set(capacity)
    held = 0
    for n in ns:
        try:
            admit(replicas, n)
            assert held + n <= capacity
            held += n
        except ResourceExhausted as refusal:
            assert held + n > capacity
            assert "every model replica is full" in refusal.message


def test_admitted_requests_route_and_give_back_their_places():
    replicas = replica_set(2, 2)
    first, second = admit(replicas, 1), admit(replicas, 1)
    assert replicas.pending == 2
    a = replicas.route(first, list(range(40)))
    b = replicas.route(second, list(range(100, 140)))  # unrelated: the other, idle replica
    assert a is not b and replicas.pending == 0 and (a.in_flight, b.in_flight) == (1, 1)
    with pytest.raises(ResourceExhausted):  # 2 places left, but not on one replica
        admit(replicas, 2)
    admit(replicas, 1), admit(replicas, 1)
    with pytest.raises(ResourceExhausted):
        admit(replicas, 1)
    first.release()
    first.release()  # once only
    assert a.in_flight == 0
    admit(replicas, 1)


def test_a_load_report_counts_other_gateways_but_not_our_own_recent_calls():
    replicas = replica_set(4)
    (replica,) = replicas.replicas.values()
    mine = admit(replicas, 2)
    replicas.route(mine, [1, 2, 3])
    replica.observe(model_pb2.Load(running_sequences=3, queued_requests=1))  # ours 2 + 2 from elsewhere
    assert replica.load(replicas.report_ttl) == 4
    with pytest.raises(ResourceExhausted):
        admit(replicas, 1)
    mine.release()
    # The model may not have dropped ours yet when it reports: they are not taken for others' calls.
    replica.observe(model_pb2.Load(running_sequences=4))
    assert replica.load(replicas.report_ttl) == 2
    admit(replicas, 2)


@pytest.mark.parametrize(("address", "entries"), [
    ("localhost:50052", [("localhost:50052", False)]),
    ("dns:///model.default.svc:50052", [("model.default.svc:50052", True)]),
    (" 127.0.0.1:1 , [::1]:2 ", [("127.0.0.1:1", False), ("[::1]:2", False)]),
])
def test_model_addresses(address: str, entries: list[tuple[str, bool]]):
    assert [(e.hostport, e.dns) for e in parse_model_address(address)] == entries


@pytest.mark.parametrize("address", ["", "nonsense", "127.0.0.1:1,nonsense", "ipv4:127.0.0.1:1", "unix:///x"])
def test_bad_model_addresses(address: str):
    with pytest.raises(ValueError):
        parse_model_address(address)


def test_a_dns_name_is_followed_as_its_addresses_come_and_go():
    answers = [["10.0.0.1:50052", "10.0.0.2:50052"], ["10.0.0.2:50052", "10.0.0.3:50052"]]

    async def resolver(entry):  # noqa: ANN001, ANN202 -- what DNS says, one answer per look-up
        assert (entry.hostport, entry.dns) == ("model.default.svc:50052", True)
        return answers.pop(0)

    async def follow() -> list[list[str]]:
        replicas = ReplicaSet("dns:///model.default.svc:50052", lambda address, name: NoChannel(), resolver=resolver)
        seen = [list(replicas.replicas)]
        await replicas._resolve()
        seen.append(list(replicas.replicas))
        replicas.index.remember("10.0.0.1:50052", [1, 2])
        await replicas._resolve()
        seen.append(list(replicas.replicas))
        assert replicas.index.cached_blocks("10.0.0.1:50052") == 0  # what it held is forgotten
        assert [r.address for r in replicas.retired] == ["10.0.0.1:50052"]  # closed once its calls end
        return seen

    assert asyncio.run(follow()) == [[], ["10.0.0.1:50052", "10.0.0.2:50052"], ["10.0.0.2:50052", "10.0.0.3:50052"]]


def test_resolving_a_name_gives_every_address():
    assert "127.0.0.1:7" in asyncio.run(resolve(ReplicaAddress("localhost:7", dns=True)))
    assert asyncio.run(resolve(ReplicaAddress("localhost:7"))) == ["localhost:7"]

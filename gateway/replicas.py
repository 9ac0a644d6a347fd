"""The model replicas behind ``--model-address``: one channel each, their health, capacity and load.

``--model-address`` names one replica (``host:port``), several (``host:port,host:port``), or a
``dns:///name:port`` whose addresses are all replicas; DNS names are resolved again every
``--model-resolve-interval`` seconds, so replicas that come and go are followed. Each replica gets its
own channel (reconnecting by itself, with client-side health checking).

What the gateway knows of each replica (``Replica``), refreshed every ``--health-interval``:

- health: its ``grpc.health.v1`` answer (and at once NOT serving when a call to it fails UNAVAILABLE);
- capacity: ``max_batch_size + max_queue`` from ``GetModelInfo`` (beyond it the model service answers
  RESOURCE_EXHAUSTED), its KV-cache block size and size (for prefix routing);
- load: sequences running or queued, as the model service reports them (``GetLoad`` each round, and
  ``GenerateResponse.load`` at the end of every generation), plus this gateway's own calls.

Load is counted as ``in_flight + others``: ``in_flight`` is the sequences of this gateway's calls to
the replica (exact), ``others`` what the replica's last report counted beyond them (other gateways'
calls). Calls this gateway ended within ``RELEASE_WINDOW`` before a report are subtracted from
``others`` too, since the model may not have processed their end yet: with one gateway ``others``
stays 0, so the gateway never refuses a request the model service would have taken; with several it
learns of the others' calls within one report. The model service keeps the final word: the gateway
refuses early only what is certain to be refused (``admit``), never admits for it.

Admission (``ReplicaSet.admit``) runs before the prompt is tokenised: a request for ``n`` sequences is
refused with RESOURCE_EXHAUSTED when no serving replica has room for it, counting requests already
admitted but still being tokenised (``pending``). The routing policy (``routing.py``) then picks the
replica once the prompt's token ids are known.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog

from llama_grpc_runtime.errors import ResourceExhausted
from llama_grpc_runtime.health import is_serving_async
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from model_service.scheduler import block_keys

from .metrics import gateway_metrics
from .routing import (
    DEFAULT_ROUTING,
    ROUTING_POLICIES,
    Balance,
    PrefixIndex,
    ReplicaView,
    Route,
    route_prefix,
    route_round_robin,
)

log = structlog.get_logger()

FRESH_REPORT = 0.01  # seconds: a refusal because of other clients' calls needs a report this recent
RELEASE_WINDOW = 1.0  # seconds: calls ended this recently may still be counted by the model's report
REPORT_TTL_ROUNDS = 5  # a load report older than this many health rounds no longer counts
UNKNOWN_CAPACITY = 1 << 30  # before GetModelInfo answered: never refuse for it


@dataclass(frozen=True)
class ReplicaAddress:
    """One entry of --model-address: a fixed ``host:port``, or a DNS name whose addresses are replicas."""

    hostport: str
    dns: bool = False


def parse_model_address(address: str) -> list[ReplicaAddress]:
    """``host:port``, ``host:port,host:port``, or ``dns:///name:port`` (entries may be mixed)."""
    entries = []
    for part in (p.strip() for p in address.split(",")):
        if not part:
            continue
        dns = part.startswith("dns:")
        hostport = part.removeprefix("dns:").removeprefix("///") if dns else part
        if "://" in hostport or hostport.startswith(("ipv4:", "ipv6:", "unix:")):
            raise ValueError(f"{part!r}: give host:port or dns:///name:port")
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{part!r} is not host:port")
        entries.append(ReplicaAddress(hostport, dns))
    if not entries:
        raise ValueError("empty model address")
    return entries


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"


async def resolve(entry: ReplicaAddress) -> list[str]:
    """The replica addresses an entry stands for now (a DNS name: each of its addresses)."""
    if not entry.dns:
        return [entry.hostport]
    host, _, port = entry.hostport.rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    return list(dict.fromkeys(_hostport(info[4][0], int(port)) for info in infos))


class Replica:
    """One model replica: its channel, health, capacity and load (see the module docstring)."""

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.stub = model_pb2_grpc.ModelServiceStub(channel)
        self.serving = False
        self.info: model_pb2.GetModelInfoResponse | None = None
        self.in_flight = 0  # sequences of this gateway's calls here, admitted and not yet ended
        self.others = 0  # sequences the last report counted beyond this gateway's
        self.reported_at = -1e9
        self._released: deque[float] = deque()  # when this gateway's recent calls here ended

    @property
    def capacity(self) -> int:
        return self.info.max_batch_size + self.info.max_queue if self.info is not None else UNKNOWN_CAPACITY

    @property
    def block_size(self) -> int:
        return self.info.kv_block_size if self.info is not None and self.info.prefix_cache else 0

    def load(self, ttl: float) -> int:
        """Sequences running or queued here, as far as this gateway knows."""
        fresh = time.monotonic() - self.reported_at <= ttl
        return self.in_flight + (self.others if fresh else 0)

    def observe(self, load: model_pb2.Load) -> None:
        """A load report from the model service (GetLoad, or the last message of a generation)."""
        now = time.monotonic()
        while self._released and now - self._released[0] > RELEASE_WINDOW:
            self._released.popleft()
        live = load.running_sequences + load.queued_requests
        self.others = max(0, live - self.in_flight - len(self._released))
        self.reported_at = now

    def observe_full(self, refused: int) -> None:
        """The replica refused a call of ``refused`` sequences (still counted in ``in_flight``) for lack
        of room: treat it as full until the next report."""
        self.others = max(self.others, self.capacity - (self.in_flight - refused))
        self.reported_at = time.monotonic()

    def take(self, n: int) -> None:
        self.in_flight += n
        gateway_metrics().replica_in_flight.labels(self.address).set(self.in_flight)

    def give_back(self, n: int, held: bool = True) -> None:
        """``n`` sequences ended; ``held``: the replica had taken them (so a report may still count them)."""
        self.in_flight -= n
        if held:
            self._released.extend([time.monotonic()] * n)
        gateway_metrics().replica_in_flight.labels(self.address).set(self.in_flight)


class Admission:
    """``n`` sequences admitted for one request: pending until routed, then held on one replica,
    given back once (when the model's stream ends, or the request fails before it)."""

    def __init__(self, replicas: ReplicaSet, n: int) -> None:
        self.replicas = replicas
        self.n = n
        self.replica: Replica | None = None
        self.released = False

    def bind(self, replica: Replica) -> None:
        if self.released:
            return
        if self.replica is None:
            self.replicas.pending -= self.n
        else:  # the previous replica failed the call: it holds nothing of it
            self.replica.give_back(self.n, held=False)
        self.replica = replica
        replica.take(self.n)

    def release(self, held: bool = True) -> None:
        """Give the sequences back (once); ``held=False`` when the replica failed the call."""
        if self.released:
            return
        self.released = True
        if self.replica is None:
            self.replicas.pending -= self.n
        else:
            self.replica.give_back(self.n, held)


class ReplicaSet:
    """Every replica of the model service; admission and routing over them."""

    def __init__(self, address: str, make_channel: Callable[[str, str | None], grpc.aio.Channel],
                 metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple, *, routing: str = DEFAULT_ROUTING,
                 health_interval: float = 1.0, resolve_interval: float = 5.0, balance: Balance = Balance(),
                 resolver: Callable[[ReplicaAddress], Awaitable[list[str]]] | None = None) -> None:
        if routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}, not {routing!r}")
        self.address = address
        self.entries = parse_model_address(address)
        self.make_channel = make_channel
        self.metadata = metadata  # the gateway's token and the caller's request id, for each call
        self.routing = routing
        self.balance = balance
        self.report_ttl = REPORT_TTL_ROUNDS * max(health_interval, 0.2)
        self.resolve_interval = resolve_interval
        self.resolver = resolver or resolve
        self.replicas: dict[str, Replica] = {}
        self.retired: list[Replica] = []  # gone from DNS: closed once their calls have ended
        self.index = PrefixIndex()
        self.pending = 0  # sequences admitted and not yet routed (their prompts being tokenised)
        self._turn = 0
        self._refreshing: asyncio.Future | None = None
        self._resolved_at = -1e9
        for entry in self.entries:
            if not entry.dns:
                self._add(entry.hostport)

    def _add(self, address: str, name: str | None = None) -> None:
        """A replica at ``address``; ``name``: the DNS name it was found under (what its TLS
        certificate names, rather than its IP address)."""
        if address not in self.replicas:
            self.replicas[address] = Replica(address, self.make_channel(address, name))
            log.info("model replica added", replica=address)

    # ---- refreshing what the gateway knows -------------------------------------------------

    async def refresh(self) -> bool:
        """One monitoring round: DNS (when due), each replica's health, info and load. True while at
        least one replica is serving."""
        if any(entry.dns for entry in self.entries) and time.monotonic() - self._resolved_at >= self.resolve_interval:
            await self._resolve()
        await asyncio.gather(*(self._check(replica) for replica in list(self.replicas.values())))
        for replica in [r for r in self.retired if r.in_flight <= 0]:
            self.retired.remove(replica)
            await replica.channel.close()
        serving = [r for r in self.replicas.values() if r.serving]
        return bool(serving)

    async def _resolve(self) -> None:
        self._resolved_at = time.monotonic()
        wanted: dict[str, str | None] = {}
        for entry in self.entries:
            try:
                name = entry.hostport.rpartition(":")[0].strip("[]") if entry.dns else None
                wanted.update((address, name) for address in await self.resolver(entry))
            except OSError as error:  # keep what we had: a DNS hiccup is not a replica leaving
                log.warning("cannot resolve model address", address=entry.hostport, error=str(error))
                return
        for address, name in wanted.items():
            self._add(address, name)
        for address in [a for a in self.replicas if a not in wanted]:
            replica = self.replicas.pop(address)
            self.index.forget(address)
            self.retired.append(replica)
            gateway_metrics().replica_up.labels(address).set(0)
            log.info("model replica removed", replica=address)

    async def _check(self, replica: Replica) -> None:
        serving = await is_serving_async(replica.channel, timeout=1.0)
        try:
            if serving and (not replica.serving or replica.info is None):  # new, or back (maybe restarted)
                replica.info = await replica.stub.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=2.0,
                                                             metadata=self.metadata())
                self.index.forget(replica.address)  # a restarted replica's cache is empty
                blocks = replica.info.kv_cache_tokens // max(replica.info.kv_block_size, 1)
                self.index.set_limit(replica.address, blocks)
            if serving:
                replica.observe((await replica.stub.GetLoad(model_pb2.GetLoadRequest(), timeout=1.0,
                                                         metadata=self.metadata())).load)
        except grpc.aio.AioRpcError as error:
            log.debug("model replica did not answer", replica=replica.address, error=error.code().name)
            serving = False
        if serving != replica.serving:
            log.info("model replica health changed", replica=replica.address, serving=serving)
        replica.serving = serving
        gateway_metrics().replica_up.labels(replica.address).set(serving)

    def mark_down(self, replica: Replica) -> None:
        """A call found the replica unreachable: no more calls until its health says SERVING again."""
        replica.serving = False
        gateway_metrics().replica_up.labels(replica.address).set(0)

    # ---- admission and routing -------------------------------------------------------------

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.serving]

    async def admit(self, n: int) -> Admission:
        """Room for ``n`` more sequences on some serving replica (counting admitted requests still
        being tokenised), or RESOURCE_EXHAUSTED now. With no replica known to serve, the call goes
        ahead and finds out (UNAVAILABLE naming the replica).

        A refusal never rests on a stale report: when only other clients' calls (``others``) fill
        the replicas and a report is older than ``FRESH_REPORT``, the loads are asked again first (one
        ``GetLoad`` per replica, shared by every request that arrives meanwhile)."""
        serving = self.serving()
        if serving and self._full(serving, n):
            if self._stale(serving) and not self._full(serving, n, own_only=True):
                await self.refresh_loads(serving)
            if self._full(serving, n):
                loads = [r.load(self.report_ttl) for r in serving]
                capacity = sum(r.capacity for r in serving)
                gateway_metrics().admission_refused.inc()
                raise ResourceExhausted(
                    f"every model replica is full: {sum(loads) + self.pending} of {capacity} sequences running, "
                    f"queued or being admitted on {len(serving)} serving replica(s) (each takes max_batch_size + "
                    f"max_queue); refused by the gateway before tokenising, retry later")
        self.pending += n
        return Admission(self, n)

    def _full(self, serving: list[Replica], n: int, own_only: bool = False) -> bool:
        rooms = [r.capacity - (r.in_flight if own_only else r.load(self.report_ttl)) for r in serving]
        return max(rooms) < n or sum(max(room, 0) for room in rooms) - self.pending < n

    @staticmethod
    def _stale(serving: list[Replica]) -> bool:
        now = time.monotonic()
        return any(now - r.reported_at > FRESH_REPORT and r.others for r in serving)

    async def refresh_loads(self, serving: list[Replica]) -> None:
        """Ask every serving replica its load now (concurrent callers share one round)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(asyncio.gather(
                *(self._ask_load(replica) for replica in serving)))
        await asyncio.shield(self._refreshing)

    async def _ask_load(self, replica: Replica) -> None:
        try:
            reply = await replica.stub.GetLoad(model_pb2.GetLoadRequest(), timeout=0.25,
                                               metadata=self.metadata())
            replica.observe(reply.load)
        except Exception as error:  # noqa: BLE001 -- no answer: the refusal rests on what we knew
            log.debug("load refresh failed", replica=replica.address, error=str(error))

    def route(self, admission: Admission, prompt_token_ids: Sequence[int], tried: Sequence[Replica] = ()) -> Replica | None:
        """The replica for this call (bound to ``admission``), skipping ``tried``; None when none is left."""
        serving = self.serving()
        # None known to serve: try each anyway (the view may be behind; the call says what is wrong).
        pool = [r for r in (serving or self.replicas.values()) if r not in tried]
        if not pool:
            return None
        n = admission.n
        # Replicas of one model share a block size; one without a prefix cache never matches.
        block_size = next((r.block_size for r in pool if r.block_size), 0) if self.routing == "prefix" else 0
        hashes = block_keys(list(prompt_token_ids), block_size) if block_size else []
        views = [ReplicaView(r.address, load := r.load(self.report_ttl), r.capacity - load,
                             self.index.matched_blocks(r.address, hashes) if r.block_size == block_size else 0)
                 for r in pool]
        if self.routing == "prefix":
            route = route_prefix(views, len(hashes), n, self.balance, self._turn)
        else:
            route = route_round_robin(views, self._turn, n)
        self._turn += 1
        replica = self.replicas[route.key]
        if hashes and replica.block_size == block_size:
            self.index.remember(replica.address, hashes)
        admission.bind(replica)
        self._routed(route, tried)
        return replica

    @staticmethod
    def _routed(route: Route, tried: Sequence[Replica]) -> None:
        reason = "retry" if tried else route.reason
        gateway_metrics().routed.labels(route.key, reason).inc()
        log.debug("routed", replica=route.key, reason=reason, matched_blocks=route.matched_blocks)

    async def info(self) -> model_pb2.GetModelInfoResponse:
        """What a serving replica says it serves (``GetModelInfo``); raises the last error when none answers."""
        error: grpc.aio.AioRpcError | None = None
        for replica in sorted(self.replicas.values(), key=lambda r: not r.serving):
            try:
                return await replica.stub.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=5.0,
                                                     metadata=self.metadata())
            except grpc.aio.AioRpcError as failure:
                error = failure
        if error is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "no model replica is known yet")
        raise error

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in [*self.replicas.values(), *self.retired]))

"""The generation engine: the step thread, and delivery of its results to asyncio.

Each step is schedule -> execute -> update (vLLM v1's ``EngineCore.step``): the scheduler
(``scheduler.py``) decides the step's work and owns every sequence's state, blocks and stop checks;
the runner (``runner.py``) turns the work into tensors and runs the forward; the engine samples one
token for each sequence whose known tokens are all cached, hands it to the scheduler, and delivers
what the reader should see. The step loop runs in a dedicated thread so the asyncio loop serving
gRPC never waits on a forward; results reach it through ``loop.call_soon_threadsafe``, once per
step. Plain Python and tensors: no protobuf here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import structlog
import torch
from prometheus_client import Counter, Gauge, Histogram

from llama_grpc_runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

from .options import Constraint, check_output, check_stopping
from .runner import LocalRunner, Runner
from .sampling import SamplingParams, SamplingRow, new_generator, sample, token_logprobs
from .scheduler import FinishReason, Scheduler, Sequence, StepPlan, Work

__all__ = ["Engine", "FinishReason", "GenerationChunk", "GenerationRequest", "GenerationStream", "Load",
           "LocalRunner", "Runner", "TokenAlternatives"]

log = structlog.get_logger()

TokenAlternatives = list[tuple[int, float]]  # (token id, logprob), most likely first


class EngineStalled(RuntimeError):
    """A step did not come back within the engine's step_timeout."""


class EngineBroken(RuntimeError):
    """Steps keep failing whatever runs in them."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 0  # 0: until a stop token or the context limit
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's own
    strict_context_limit: bool = False  # refuse prompt + max_new_tokens > context instead of cutting short
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False  # with logprobs/top_logprobs: also those of the prompt tokens
    request_id: str = ""
    timeout: float | None = None  # seconds the caller still waits (its gRPC deadline)
    min_new_tokens: int = 0  # stop tokens are masked out until this many were generated
    time_limit_ms: int = 0  # 0: none; else ends with TIME_LIMIT and what it has
    truncate_prompt_tokens: int = 0  # 0: the whole prompt; else only its last N tokens
    constraint: Constraint | None = None  # structured output

    @property
    def prompt(self) -> list[int]:
        """The prompt the model sees (after truncate_prompt_tokens)."""
        if self.truncate_prompt_tokens and len(self.prompt_token_ids) > self.truncate_prompt_tokens:
            return self.prompt_token_ids[-self.truncate_prompt_tokens:]
        return self.prompt_token_ids

    def validate(self, vocab_size: int, max_seq_len: int) -> None:
        """Raise ``InvalidArgument`` naming the field of the first problem found."""
        check_stopping(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                       time_limit_ms=self.time_limit_ms, truncate_prompt_tokens=self.truncate_prompt_tokens)
        prompt = self.prompt
        if not prompt:
            raise InvalidArgument("prompt_token_ids", "must not be empty")
        for position, token_id in enumerate(prompt):
            if not 0 <= token_id < vocab_size:
                raise InvalidArgument("prompt_token_ids", f"id {token_id} at position {position} is outside "
                                      f"the vocabulary [0, {vocab_size})")
        if len(prompt) >= max_seq_len:
            raise InvalidArgument("prompt_token_ids", f"the prompt has {len(prompt)} tokens but the context holds "
                                  f"{max_seq_len}, so a prompt may have at most {max_seq_len - 1}")
        self.sampling.validate(vocab_size)
        if self.strict_context_limit and len(prompt) + self.max_new_tokens > max_seq_len:
            raise InvalidArgument("stopping.max_new_tokens", f"the prompt's {len(prompt)} tokens + max_new_tokens "
                                  f"{self.max_new_tokens} = {len(prompt) + self.max_new_tokens} exceed the "
                                  f"context of {max_seq_len} tokens")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidArgument("stopping.stop_token_ids",
                                      f"id {token_id} is outside the vocabulary [0, {vocab_size})")
        check_output(top_logprobs=self.top_logprobs)
        if self.constraint is not None:
            self.constraint.check()


@dataclass
class GenerationChunk:
    """What a stream yields: new tokens (several when the reader fell behind), and at the end why."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # when asked
    top_logprobs: list[TokenAlternatives] = field(default_factory=list)  # when asked
    # With echo, on the first chunk: each prompt token's logprob given the ones before (first: 0).
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TokenAlternatives] = field(default_factory=list)
    finish_reason: FinishReason | None = None  # set on the last chunk only
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the prefix cache (set on the last chunk)
    generated_tokens: int = 0  # tokens returned so far (a stop token is not returned)
    error: Exception | None = None

    def merge(self, later: GenerationChunk) -> None:
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.top_logprobs += later.top_logprobs
        self.prompt_logprobs += later.prompt_logprobs
        self.prompt_top_logprobs += later.prompt_top_logprobs
        self.finish_reason = later.finish_reason or self.finish_reason
        self.prompt_tokens = later.prompt_tokens or self.prompt_tokens
        self.cached_prompt_tokens = later.cached_prompt_tokens or self.cached_prompt_tokens
        self.generated_tokens = max(self.generated_tokens, later.generated_tokens)
        self.error = later.error or self.error


@dataclass(frozen=True)
class Load:
    """How busy the engine is (what a router balancing replicas wants to know)."""

    running_sequences: int = 0
    queued_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


@dataclass(frozen=True)
class EngineMetrics:
    running: Gauge
    queued: Gauge
    slots_used: Gauge
    cached_tokens: Gauge
    blocks_used: Gauge
    blocks_total: Gauge
    generated_tokens: Counter
    prompt_tokens: Counter
    prefix_hit_tokens: Counter
    preemptions: Counter
    finished: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    step_seconds: Histogram
    step_tokens: Histogram


@cache
def engine_metrics() -> EngineMetrics:
    """Created once per process (Prometheus' registry refuses duplicates)."""
    p = "llama_model"
    return EngineMetrics(
        running=Gauge(f"{p}_running_sequences", "sequences in the running batch (prefilling or decoding)"),
        queued=Gauge(f"{p}_queued_requests", "requests waiting for the batch (new or preempted)"),
        slots_used=Gauge(f"{p}_kv_slots_used", "sequences holding KV-cache blocks"),
        cached_tokens=Gauge(f"{p}_kv_cached_tokens", "tokens of running sequences whose keys/values are cached"),
        blocks_used=Gauge(f"{p}_kv_blocks_used", "KV-cache blocks held by sequences"),
        blocks_total=Gauge(f"{p}_kv_blocks_total", "KV-cache blocks in the pool"),
        generated_tokens=Counter(f"{p}_generated_tokens_total", "tokens generated and returned"),
        prompt_tokens=Counter(f"{p}_prompt_tokens_total", "prompt tokens of admitted requests"),
        prefix_hit_tokens=Counter(f"{p}_prefix_cache_hit_tokens_total",
                                  "prompt tokens served from the prefix cache instead of computed"),
        preemptions=Counter(f"{p}_preemptions_total", "sequences preempted for lack of KV-cache blocks"),
        finished=Counter(f"{p}_finished_requests_total", "generations ended, by finish reason", ["reason"]),
        time_to_first_token=Histogram(
            f"{p}_time_to_first_token_seconds", "arrival to first sampled token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
        inter_token_latency=Histogram(
            f"{p}_inter_token_latency_seconds", "time between a sequence's consecutive tokens",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
        step_seconds=Histogram(
            f"{p}_step_seconds", "one engine step: forward over the batch plus sampling",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
        step_tokens=Histogram(
            f"{p}_step_tokens", "tokens fed to one forward (prompt chunks + decode tokens)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    )


class GenerationStream:
    """The asyncio side of one request: ``async for chunk in stream``; ``cancel()`` when abandoned.

    Chunks pushed by the engine between two reads are merged into one, so a slow reader gets
    several tokens at a time instead of an ever-growing backlog of messages.
    """

    def __init__(self, engine: Engine, req: _Request) -> None:
        self._engine = engine
        self._req = req
        self._pending: list[GenerationChunk] = []
        self._ready = asyncio.Event()
        self._done = False

    def _push(self, chunk: GenerationChunk) -> None:  # on the event loop's thread
        self._pending.append(chunk)
        self._ready.set()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        merged, *later = self._pending
        self._pending = []
        for chunk in later:
            merged.merge(chunk)
        if merged.finish_reason is not None or merged.error is not None:
            self._done = True
        if merged.error is not None:
            raise merged.error
        return merged

    def cancel(self) -> None:
        """Stop generating (no-op once finished); the slot is free by the next step."""
        if not self._done:
            self._engine.cancel(self._req)


class _Request:
    """What the engine tracks for one request beside its scheduler ``Sequence``: delivery, timing, sampling."""

    def __init__(self, request: GenerationRequest, seq: Sequence) -> None:
        self.request = request
        self.seq = seq
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stream: GenerationStream | None = None
        self.internal = False  # the warm-up: no metrics, no delivery
        self.arrival = time.perf_counter()
        self.deadline = None if request.timeout is None else time.monotonic() + request.timeout
        self.time_limit = time.monotonic() + request.time_limit_ms / 1000 if request.time_limit_ms else None
        self.grammar: str | None = None  # the compiled constraint (engine.grammars)
        self.want_prompt_logprobs = request.echo and (request.logprobs or request.top_logprobs > 0)
        self.prompt_logprobs: list[float] = []
        self.prompt_top_logprobs: list[TokenAlternatives] = []
        self.reset_prompt_logprobs()
        self.row: SamplingRow | None = None  # made on first admission, on the engine's thread and device
        self.last_token_time: float | None = None
        self.cancelled = False
        self.finished = False
        self.siblings: list[_Request] = []  # completions of the same prompt, forked once its prompt is cached

    def reset_prompt_logprobs(self) -> None:
        self.prompt_logprobs = [0.0] if self.want_prompt_logprobs else []  # the first token has none
        self.prompt_top_logprobs = [[]] if self.want_prompt_logprobs else []

    @property
    def echoing(self) -> bool:
        """Prompt logprobs still to compute: asked for, and not yet sent with the first token."""
        return self.want_prompt_logprobs and self.last_token_time is None


class Engine:
    """Continuous batching over a paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, runner: Runner, *, vocab_size: int, max_seq_len: int, max_batch_size: int,
                 max_queue: int = 64, prefill_chunk: int = 256, stop_token_ids: tuple[int, ...] = (),
                 num_blocks: int | None = None, block_size: int = 16, prefix_cache: bool = True,
                 on_fatal: Callable[[BaseException], None] | None = None, grammars: object | None = None,
                 step_timeout: float | None = None, max_step_failures: int = 3) -> None:
        self.runner = runner
        self.device = runner.device
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stop_token_ids = tuple(stop_token_ids)
        self.on_fatal = on_fatal
        self.grammars = grammars  # grammar.Grammars over the model's vocabulary; None: no structured output
        # Health tells the truth: a step (forward or heartbeat) running longer than step_timeout (a
        # wedged rank, a hung device) or max_step_failures steps in a row in which no forward
        # succeeded (an unusable device) make the engine fail, and the service exit non-zero.
        self.step_timeout = step_timeout
        self.max_step_failures = max_step_failures
        self._busy_since: float | None = None  # monotonic start of the forward/heartbeat in progress
        self._forward_ok = False
        self._failed_steps = 0
        if num_blocks is None:  # as much as max_batch_size slots of max_seq_len tokens
            num_blocks = max_batch_size * -(-max_seq_len // block_size)
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.scheduler = Scheduler(max_batch_size, prefill_chunk, num_blocks=num_blocks, block_size=block_size,
                                   prefix_cache=prefix_cache, max_seq_len=max_seq_len)
        self.kv_cache_tokens = self.scheduler.capacity_tokens
        self.metrics = engine_metrics()
        self.metrics.blocks_total.set(num_blocks)
        self.steps = 0
        # Shared with the event loop's thread, under _cond: arrivals, live requests, state flags.
        self._cond = threading.Condition()
        self._inbox: list[_Request] = []
        self._live: set[_Request] = set()
        self._load = Load(kv_blocks_total=num_blocks)
        self._closed = False
        self._stop = False
        self._failure: BaseException | None = None
        self._requests: dict[Sequence, _Request] = {}  # engine thread only, from here on
        self._outbox: list[tuple[_Request, GenerationChunk]] = []
        self._thread: threading.Thread | None = None

    # ---- the event loop's side -------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """The request's own rules, and whether it can ever fit the KV cache."""
        request.validate(self.vocab_size, self.max_seq_len)
        capacity = self.kv_cache_tokens
        prompt_len = len(request.prompt)
        if prompt_len >= capacity:
            raise InvalidArgument("prompt_token_ids", f"the prompt has {prompt_len} tokens but the KV cache holds "
                                  f"{capacity} (--kv-cache-tokens), so a prompt may have at most {capacity - 1}")
        if request.max_new_tokens and prompt_len + request.max_new_tokens > capacity:
            raise InvalidArgument("stopping.max_new_tokens", f"the prompt's {prompt_len} tokens + max_new_tokens "
                                  f"{request.max_new_tokens} = {prompt_len + request.max_new_tokens} exceed the KV "
                                  f"cache of {capacity} tokens (--kv-cache-tokens)")

    def _new_request(self, request: GenerationRequest) -> _Request:
        prompt = request.prompt  # after truncate_prompt_tokens
        seq = Sequence(tokens=list(prompt), prompt_len=len(prompt),
                       # Unset: only the context (or a stop token) ends it, and it ends with CONTEXT_LIMIT.
                       max_new_tokens=request.max_new_tokens or self.max_seq_len,
                       stop_ids=frozenset(self.stop_token_ids) | frozenset(request.stop_token_ids),
                       use_prefix_cache=self._may_reuse_blocks(request))
        return _Request(request, seq)

    @staticmethod
    def _may_reuse_blocks(request: GenerationRequest) -> bool:
        """Whether a request may start from cached blocks that other requests left behind.

        Not when it wants prompt logprobs (every prompt position must be computed), nor when it
        samples with a seed: the same seeded request on an idle server gives the same tokens every
        time, and keys/values computed in other chunks differ in float rounding (~1e-7), enough to
        flip a sampled token. Greedy output does not change (tested), so greedy and unseeded requests
        reuse blocks. (Sharing the prompt of an identical request still live is another rule:
        ``_live_twin``.)
        """
        if request.echo and (request.logprobs or request.top_logprobs > 0):
            return False
        return request.sampling.greedy or request.sampling.seed is None

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue a request; called on the event loop that will read the stream."""
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[GenerationRequest]) -> list[GenerationStream]:
        """Queue completions of one prompt (``n``): the first computes the prompt, and in the step that
        completes it the others fork from it (``Scheduler.fork``: they share its prompt blocks).

        Seeded groups fork too: the forks join at a step fixed by the schedule, never by timing, so
        the same group gives the same tokens every time (alone on a server, the prompt blocks are the
        group's own, not a finished request's, which ``_may_reuse_blocks`` rules out for seeded ones).
        """
        reqs = [self._prepare(request) for request in requests]
        if len({tuple(req.seq.tokens) for req in reqs}) > 1:
            raise ValueError("submit_group() takes completions of one prompt")
        first = reqs[0]
        first.siblings, reqs_now = reqs[1:], [first]
        with self._cond:
            if self._failure is not None:
                raise Unavailable("the model engine failed and the service is restarting; retry shortly")
            if self._closed:
                raise Unavailable("the model service is shutting down")
            if len(self._live) + len(reqs) > self.max_batch_size + self.max_queue:
                running = self._load.running_sequences
                raise ResourceExhausted(
                    f"{running} sequences are running and {len(self._live) - running} "
                    f"waiting, the most this server queues (--max-batch-size {self.max_batch_size} + "
                    f"--max-queue {self.max_queue}); retry later")
            self._inbox += reqs_now
            self._live.update(reqs)
            self._update_gauges()
            self._cond.notify()
        return [req.stream for req in reqs]

    def _prepare(self, request: GenerationRequest) -> _Request:
        self.validate(request)
        req = self._new_request(request)
        if request.constraint is not None:
            if self.grammars is None:
                raise FailedPrecondition("constraint: this model service has no tokenizer files beside its "
                                         "checkpoint, so it cannot enforce structured output")
            req.grammar = self.grammars.compile(request.constraint)  # type: ignore[attr-defined]
        req.loop = asyncio.get_running_loop()
        req.stream = GenerationStream(self, req)
        return req

    def cancel(self, req: _Request) -> None:
        with self._cond:
            if not req.finished and not req.cancelled:
                req.cancelled = True
                self._cond.notify()

    def close(self) -> None:
        """Refuse new requests (UNAVAILABLE); running ones go on."""
        with self._cond:
            self._closed = True

    def cancel_all(self) -> None:
        with self._cond:
            for req in self._live:
                req.cancelled = True
            self._cond.notify()

    @property
    def num_live(self) -> int:
        with self._cond:
            return len(self._live)

    def load(self) -> Load:
        """Running and queued sequences and blocks in use, as of the last step (any thread)."""
        with self._cond:
            running = self._load.running_sequences
            return Load(running, len(self._live) - running, self._load.kv_blocks_used, self._load.kv_blocks_total)

    # ---- lifecycle ---------------------------------------------------------------------------

    def warm_up(self, prompt_len: int = 8) -> None:
        """One real generation (prefill, sampling, a decode step) before the thread starts serving."""
        prompt_len = max(1, min(prompt_len, self.max_seq_len - 3, self.kv_cache_tokens - 3))
        request = GenerationRequest(list(range(prompt_len)), SamplingParams(seed=0), max_new_tokens=2)
        req = self._new_request(request)
        req.seq.use_prefix_cache = False  # leave nothing of it behind for real requests to hit
        req.internal = True
        with self._cond:
            self._live.add(req)
        self._requests[req.seq] = req
        self.scheduler.add(req.seq)
        while not req.finished:
            self._step()
        self._outbox.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        if self.step_timeout:
            threading.Thread(target=self._watchdog, name="engine-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        """Fail the engine when a step has not come back within step_timeout (from its own thread:
        the step thread is the one that is stuck)."""
        assert self.step_timeout
        while not self._stop:
            busy_since = self._busy_since
            if busy_since is not None and time.monotonic() - busy_since > self.step_timeout:
                self.fail(EngineStalled(f"an engine step has not finished after {self.step_timeout:g} s "
                                        "(--step-timeout): a wedged tensor-parallel rank or a hung device"))
                return
            time.sleep(min(1.0, self.step_timeout / 4))

    def stop(self, timeout: float = 10.0) -> None:
        """End the step thread (cancelling what still runs); it releases the runner on its way out."""
        with self._cond:
            self._closed = self._stop = True
            failed = self._failure is not None
            self._cond.notify()
        if self._thread is None:
            self.runner.close()
            return
        self._thread.join(1.0 if failed else timeout)
        if self._thread.is_alive():  # stuck in a forward that cannot finish (a rank died)
            log.warning("engine thread did not stop; aborting the runner")
            self.runner.abort()

    def fail(self, error: BaseException) -> None:
        """The engine cannot go on (e.g. a tensor-parallel rank died): fail every request now.

        Safe from any thread, even while the step thread is stuck in a collective that will never
        complete: only the streams are touched, not the scheduler.
        """
        with self._cond:
            if self._failure is not None:
                return
            self._failure = error
            self._closed = self._stop = True
            victims = list(self._live)
            self._cond.notify()
        log.error("engine failed", error=repr(error), requests=len(victims))
        # The cause (e.g. a gloo socket error) is in the log; the caller learns what to do about it.
        message = Unavailable("the model engine failed and the service is restarting; retry shortly")
        for req in victims:
            req.finished = True
            self._outbox_deliver([(req, GenerationChunk(error=message))])
        if self.on_fatal is not None:
            self.on_fatal(error)

    # ---- the step thread ---------------------------------------------------------------------

    def _run(self) -> None:
        structlog.contextvars.bind_contextvars(service="model", thread="engine")
        try:
            while True:
                heartbeat = False
                with self._cond:
                    while not self._stop and not self._inbox and not len(self.scheduler):
                        if not self._cond.wait(self.runner.heartbeat_interval) and self.runner.heartbeat_interval:
                            heartbeat = True
                            break
                    if self._stop:
                        break
                self._busy_since = time.monotonic()
                if heartbeat:
                    self.runner.heartbeat()
                else:
                    self._step()
                self._busy_since = None
        except BaseException as exc:  # noqa: BLE001 -- whatever it was, every waiting stream must hear
            self._flush()  # what this step already decided (e.g. sequences it failed) goes out first
            if self._failure is None:
                log.exception("engine step loop died")
            self.fail(exc)
            self.runner.abort()
            return
        with self._cond:
            remaining = list(self._live)
        for req in remaining:  # stop(): what still runs (or waits to fork) is cancelled
            if not req.finished:
                self._finish(req, FinishReason.CANCELLED)
        self._flush()
        self.runner.close()

    def _step(self) -> None:
        self._intake()
        plan = self.scheduler.schedule()
        self._after_schedule(plan)
        work = plan.work
        self._refresh_gauges()
        if work:
            started = time.perf_counter()
            self._forward_ok = False
            self._execute(work)
            self._failed_steps = 0 if self._forward_ok else self._failed_steps + 1
            if self._failed_steps >= self.max_step_failures:
                raise EngineBroken(f"{self._failed_steps} engine steps in a row failed for every sequence in "
                                   "them: the model or its device is unusable")
            self.steps += 1
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self.metrics.step_tokens.observe(sum(item.length for item in work))
            self._refresh_gauges()  # finished sequences left the batch during this step
        self._flush()

    def _intake(self) -> None:
        """Take new arrivals; drop cancelled and expired requests (their blocks free this step)."""
        with self._cond:
            arrivals, self._inbox = self._inbox, []
        for req in arrivals:
            twin = self._live_twin(req) if self.prefix_cache else None
            if twin is None:
                self._schedule([req])
            elif twin.seq.prefilled:  # decoding: its prompt blocks are in the cache now
                group, req.siblings = [req, *req.siblings], []
                self._schedule(group, parent=twin.seq, first=False)  # in line as it arrived
            else:  # waiting or part-way through its prompt: fork when it is cached (or compute it if the twin ends)
                twin.siblings += [req, *req.siblings]
                req.siblings = []
        now = time.monotonic()
        for req in list(self._requests.values()):
            if req.cancelled:
                self._finish(req, FinishReason.CANCELLED)
            elif req.deadline is not None and now >= req.deadline:
                self._finish(req, None, error=DeadlineExceeded(
                    f"deadline passed after {len(req.seq.generated)} generated tokens"))
            elif req.time_limit is not None and now >= req.time_limit:
                self._finish(req, FinishReason.TIME_LIMIT)

    def _live_twin(self, req: _Request) -> _Request | None:
        """A running or waiting request with the same prompt, which ``req`` may fork from, or None.

        Identical prompts live at the same time are computed once, as ``n`` completions are (SGLang's
        cache-aware scheduler likewise holds back a waiting request whose prefix another in the same
        batch is computing): the later ones share the first one's full prompt blocks and recompute only
        its partial last block, forking at once from a twin that is decoding, else when its prompt is in
        the cache (``_execute``), or computing their own if it ends first (``_finish``). Seeded requests too: which twins are live is
        part of the load, and the same load gives the same tokens; a request never starts from the
        cached blocks of a *finished* one (``_may_reuse_blocks``), so a seeded request alone on an idle
        server gives the same tokens every time. Not for a request that wants its prompt's logprobs
        (every position must be computed), nor with ``--no-prefix-cache``.
        """
        if req.want_prompt_logprobs or req.internal:
            return None
        seq = req.seq
        for other in self._requests.values():  # live ones: _finish takes a request out
            twin = other.seq
            if (twin.prompt_len == seq.prompt_len and not other.internal and not other.cancelled
                    and twin.tokens[:twin.prompt_len] == seq.tokens):
                return other
        return None

    def _after_schedule(self, plan: StepPlan) -> None:
        for seq in plan.preempted:
            req = self._requests[seq]
            if req.echoing:  # its prompt logprobs are recomputed on resumption
                req.reset_prompt_logprobs()
            if not req.internal:
                self.metrics.preemptions.inc()
                log.info("sequence preempted", request_id=req.request.request_id, tokens=len(seq.tokens),
                         blocks_free=self.scheduler.pool.available)
        for seq in plan.admitted:
            req = self._requests[seq]
            if req.row is None:  # first admission (not a resumption)
                self._first_admission(req)

    def _first_admission(self, req: _Request) -> None:
        params = req.request.sampling
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(req.seq.tokens, device=self.device)] = True
        generator = None if params.greedy else new_generator(params.seed)
        row = req.row = SamplingRow(params, generator, seen, req.request.logprobs, req.request.top_logprobs)
        if params.penalises_counts:
            row.counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        if req.request.min_new_tokens and req.seq.stop_ids:
            row.stop_token_ids = torch.tensor(sorted(req.seq.stop_ids), dtype=torch.long, device=self.device)
            row.min_new_tokens = req.request.min_new_tokens
        if req.grammar is not None:
            row.grammars = self.grammars
            row.matcher = self.grammars.matcher(req.grammar)  # type: ignore[attr-defined]
        if not req.internal:
            self.metrics.prompt_tokens.inc(req.seq.prompt_len)
            self.metrics.prefix_hit_tokens.inc(req.seq.cached_prompt_tokens)

    def _execute(self, work: list[Work]) -> None:
        """One forward over ``work``, then its tokens. A failure stays with the sequence that caused it.

        A failed forward is retried one sequence at a time (it wrote only the positions the retry
        writes again), so the sequences that did not cause it get the logits they would get alone.
        Under tensor parallelism a failed forward leaves the ranks out of step: that is fatal.
        Everything after the forward (echo logprobs, sampling) runs on this rank only and is
        confined per sequence.
        """
        reqs = [self._requests[item.seq] for item in work]
        echoing = [req.echoing and item.start < item.seq.prompt_len for req, item in zip(reqs, work, strict=True)]
        try:
            logits = self.runner.forward(work, any(echoing))  # [n_seqs or n_tokens, vocab]
        except Exception as exc:
            if self.runner.fatal_errors:
                raise
            if len(work) > 1:
                log.warning("engine step failed; retrying its sequences one at a time",
                            error=repr(exc), sequences=len(work))
                for item in work:
                    self._execute([item])
                return
            log.exception("engine step failed for one sequence", request_id=reqs[0].request.request_id)
            self._finish(reqs[0], None, error=ServiceError("the model failed on this request; "
                                                           "details are in the model service log"))
            return
        self._forward_ok = True
        if any(echoing):
            rows, offset = [], 0
            for item, req, echo in zip(work, reqs, echoing, strict=True):
                if echo:
                    self._guarded(req, self._prompt_logprobs, item, req, logits[offset:offset + item.length])
                offset += item.length
                rows.append(offset - 1)
            logits = logits[torch.tensor(rows, device=logits.device)]  # [n_seqs, vocab]
        self.scheduler.advance(work)
        for req in reqs:
            if req.siblings and req.seq.prefilled and not req.finished:
                self._release_siblings(req, fork=True)
        completing = [(i, req) for i, (item, req) in enumerate(zip(work, reqs, strict=True))
                      if item.completes and not req.finished]
        if not completing:
            return
        rows = torch.tensor([i for i, _ in completing], device=logits.device)
        sampled = sample(logits[rows], [req.row for _, req in completing])
        now = time.perf_counter()
        for (_, req), choice in zip(completing, sampled, strict=True):
            if choice.error is not None:
                log.error("sequence failed", request_id=req.request.request_id, error=choice.error)
                self._finish(req, None, error=ServiceError(choice.error))
            else:
                self._guarded(req, self._accept, req, choice.token_id, choice.logprob, choice.top_logprobs, now)

    def _guarded(self, req: _Request, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn`` for one sequence; if it raises, that sequence alone ends with an error."""
        try:
            fn(*args)
        except Exception:
            log.exception("sequence failed", request_id=req.request.request_id)
            if not req.finished:
                self._finish(req, None, error=ServiceError("generation failed for this request; "
                                                           "details are in the model service log"))

    def _prompt_logprobs(self, item: Work, req: _Request, logits: torch.Tensor) -> None:
        """logits: [length, vocab] for positions start.. of a prompt chunk, each predicting the next token."""
        seq = item.seq
        count = min(item.length, seq.prompt_len - 1 - item.start)  # the last position predicts the output
        if count <= 0:
            return
        targets = torch.tensor(seq.tokens[item.start + 1:item.start + 1 + count], device=logits.device)
        chosen, alternatives = token_logprobs(logits[:count], targets, req.request.top_logprobs)
        req.prompt_logprobs += chosen
        req.prompt_top_logprobs += alternatives

    def _accept(self, req: _Request, token_id: int, logprob: float | None, alternatives: TokenAlternatives,
                now: float) -> None:
        """A sampled token: the scheduler keeps it or stops on it; the reader hears either."""
        seq = req.seq
        if not req.internal:
            if req.last_token_time is None:
                self.metrics.time_to_first_token.observe(now - req.arrival)
            else:
                self.metrics.inter_token_latency.observe(now - req.last_token_time)
        chunk = GenerationChunk()
        if req.echoing:
            chunk.prompt_logprobs = req.prompt_logprobs
            chunk.prompt_top_logprobs = req.prompt_top_logprobs if req.request.top_logprobs else []
        req.last_token_time = now
        reason = self.scheduler.append_token(seq, token_id)
        if reason is not FinishReason.STOP_TOKEN:
            if req.row is not None:
                req.row.observe(token_id)
            chunk.token_ids.append(token_id)
            if req.request.logprobs:
                chunk.logprobs.append(logprob if logprob is not None else 0.0)
            if req.request.top_logprobs:
                chunk.top_logprobs.append(alternatives)
            if not req.internal:
                self.metrics.generated_tokens.inc()
        if reason is not None:
            self._finish(req, reason, chunk)
        else:
            chunk.generated_tokens = len(seq.generated)
            self._outbox.append((req, chunk))

    def _finish(self, req: _Request, reason: FinishReason | None, chunk: GenerationChunk | None = None,
                error: Exception | None = None) -> None:
        """Take the request out of the batch (its blocks are free for the next step) and tell its reader."""
        seq = req.seq
        self.scheduler.finish(seq, reason)
        self._requests.pop(seq, None)
        if req.siblings:  # it ended before its prompt was cached: they compute it themselves
            self._release_siblings(req, fork=False)
        chunk = chunk or GenerationChunk()
        chunk.finish_reason = reason
        chunk.error = error
        chunk.prompt_tokens = seq.prompt_len
        chunk.cached_prompt_tokens = seq.cached_prompt_tokens
        chunk.generated_tokens = len(seq.generated)
        with self._cond:
            req.finished = True
            self._live.discard(req)
            self._snapshot_load()
            self._update_gauges()  # before the counter and the log line below: they never run ahead of it
        if req.internal:
            return
        outcome = reason.value if reason is not None else type(error).__name__
        self.metrics.finished.labels(outcome).inc()
        log.info("generation finished", request_id=req.request.request_id, finish_reason=outcome,
                 prompt_tokens=seq.prompt_len, cached_prompt_tokens=seq.cached_prompt_tokens,
                 generated_tokens=len(seq.generated), preemptions=seq.num_preemptions,
                 seconds=round(time.perf_counter() - req.arrival, 4))
        self._outbox.append((req, chunk))

    def _release_siblings(self, req: _Request, fork: bool) -> None:
        siblings, req.siblings = req.siblings, []
        self._schedule(siblings, parent=req.seq if fork else None)

    def _schedule(self, reqs: list[_Request], parent: Sequence | None = None, first: bool = True) -> None:
        """Hand requests to the scheduler: new (``parent`` None), or forks of ``parent``'s cached prompt."""
        for req in reqs:
            self._requests[req.seq] = req
            if parent is None:
                self.scheduler.add(req.seq)
            else:
                self.scheduler.fork(parent, req.seq, first=first)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        self._outbox_deliver(outbox)

    @staticmethod
    def _outbox_deliver(items: list[tuple[_Request, GenerationChunk]]) -> None:
        """Hand chunks to their event loops: one callback per loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationStream, GenerationChunk]]] = {}
        for req, chunk in items:
            if req.loop is not None and req.stream is not None:
                by_loop.setdefault(req.loop, []).append((req.stream, chunk))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                pass

    def _snapshot_load(self) -> None:  # under _cond, on the engine thread
        scheduler = self.scheduler
        self._load = Load(scheduler.num_running, scheduler.num_waiting, scheduler.pool.used, scheduler.num_blocks)

    def _refresh_gauges(self) -> None:
        with self._cond:
            self._snapshot_load()
            self._update_gauges()
        self.metrics.cached_tokens.set(self.scheduler.num_cached_tokens)

    def _update_gauges(self) -> None:  # under _cond
        running = self._load.running_sequences
        self.metrics.running.set(running)
        self.metrics.slots_used.set(running)
        self.metrics.queued.set(len(self._live) - running)
        self.metrics.blocks_used.set(self._load.kv_blocks_used)


def _deliver(batch: list[tuple[GenerationStream, GenerationChunk]]) -> None:
    for stream, chunk in batch:
        stream._push(chunk)

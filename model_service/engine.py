"""The generation engine: continuous batching over KV-cache slots, stepping in a thread of its own.

Requests join the running batch between steps and leave it when they finish (iteration-level
scheduling, see ``scheduler.py``). Each step is one forward over every sequence holding a slot, then
one sampled token for each sequence whose known tokens are all cached. The step loop runs in a
dedicated thread so the asyncio loop serving gRPC never waits on a forward; results reach it through
``loop.call_soon_threadsafe``, once per step. Plain Python and tensors: no protobuf here.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

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
from .sampling import SamplingParams, SamplingRow, new_generator, sample, token_logprobs
from .scheduler import Scheduler, Sequence, Work

log = structlog.get_logger()

TokenAlternatives = list[tuple[int, float]]  # (token id, logprob), most likely first


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP_TOKEN = "stop_token"  # the model's or the caller's stop token (not returned)
    CONTEXT_LIMIT = "context_limit"  # prompt + output filled the context
    CANCELLED = "cancelled"  # the caller went away, or the server is shutting down
    TIME_LIMIT = "time_limit"  # time_limit_ms ran out: the output so far is the answer


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
        self.generated_tokens = max(self.generated_tokens, later.generated_tokens)
        self.error = later.error or self.error


class Runner(Protocol):
    """Runs the model's forward for the engine: in this process, or on every tensor-parallel rank."""

    device: torch.device
    fatal_errors: bool  # a failed step leaves the runner unusable (ranks out of step)
    heartbeat_interval: float | None  # call heartbeat() when idle this long (None: never)

    def forward(self, batch: object, all_logits: bool) -> torch.Tensor: ...
    def heartbeat(self) -> None: ...
    def close(self) -> None: ...  # from the step thread, on its way out
    def abort(self) -> None: ...  # from any thread, when the step thread is stuck


class LocalRunner:
    """The whole model in this process."""

    fatal_errors = False
    heartbeat_interval = None

    def __init__(self, model: torch.nn.Module, device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)

    def forward(self, batch: object, all_logits: bool) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward(batch, all_logits=all_logits)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        self.model.copy_prefix(src_slot, dst_slot, length)

    def heartbeat(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


@dataclass(frozen=True)
class EngineMetrics:
    running: Gauge
    queued: Gauge
    slots_used: Gauge
    cached_tokens: Gauge
    generated_tokens: Counter
    prompt_tokens: Counter
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
        running=Gauge(f"{p}_running_sequences", "sequences holding a cache slot (prefilling or decoding)"),
        queued=Gauge(f"{p}_queued_requests", "requests waiting for a cache slot"),
        slots_used=Gauge(f"{p}_kv_slots_used", "KV-cache slots in use"),
        cached_tokens=Gauge(f"{p}_kv_cached_tokens", "tokens whose keys/values are in the cache"),
        generated_tokens=Counter(f"{p}_generated_tokens_total", "tokens generated and returned"),
        prompt_tokens=Counter(f"{p}_prompt_tokens_total", "prompt tokens run through the model"),
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

    def __init__(self, engine: Engine, seq: _Seq) -> None:
        self._engine = engine
        self._seq = seq
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
            self._engine.cancel(self._seq)


class _Seq(Sequence):
    """A sequence plus everything the engine tracks for its request."""

    def __init__(self, request: GenerationRequest, engine: Engine) -> None:
        prompt = request.prompt
        super().__init__(tokens=list(prompt), prompt_len=len(prompt))
        self.request = request
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stream: GenerationStream | None = None
        self.internal = False  # the warm-up: no metrics, no delivery
        self.arrival = time.perf_counter()
        self.deadline = None if request.timeout is None else time.monotonic() + request.timeout
        self.time_limit = time.monotonic() + request.time_limit_ms / 1000 if request.time_limit_ms else None
        self.grammar: str | None = None  # the compiled constraint (engine.grammars)
        self.stop_ids = frozenset(engine.stop_token_ids) | frozenset(request.stop_token_ids)
        # Unset: only the context (or a stop token) ends it, and it ends with CONTEXT_LIMIT.
        self.max_new_tokens = request.max_new_tokens or engine.max_seq_len
        self.want_prompt_logprobs = request.echo and (request.logprobs or request.top_logprobs > 0)
        self.prompt_logprobs: list[float] = [0.0] if self.want_prompt_logprobs else []
        self.prompt_top_logprobs: list[TokenAlternatives] = [[]] if self.want_prompt_logprobs else []
        self.row: SamplingRow | None = None  # made on admission, on the engine's thread and device
        self.fork_of: _Seq | None = None  # n > 1: the completion whose cached prompt this one copies
        self.last_token_time: float | None = None
        self.cancelled = False
        self.finished = False

    def ready(self) -> bool:
        parent = self.fork_of
        return parent is None or parent.finished or (parent.slot >= 0 and not parent.prefilling)


class Engine:
    """Continuous batching over ``max_batch_size`` cache slots of ``max_seq_len`` tokens each."""

    def __init__(self, runner: Runner, *, vocab_size: int, max_seq_len: int, max_batch_size: int,
                 max_queue: int = 64, prefill_chunk: int = 256, stop_token_ids: tuple[int, ...] = (),
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
        self.scheduler = Scheduler(max_batch_size, prefill_chunk)
        self.metrics = engine_metrics()
        self.steps = 0
        # Shared with the event loop's thread, under _cond: arrivals, live requests, state flags.
        self._cond = threading.Condition()
        self._inbox: list[_Seq] = []
        self._live: set[_Seq] = set()
        self._num_running = 0
        self._closed = False
        self._stop = False
        self._failure: BaseException | None = None
        self._outbox: list[tuple[_Seq, GenerationChunk]] = []  # engine thread only
        self._thread: threading.Thread | None = None

    # ---- the event loop's side -------------------------------------------------------------

    def submit(self, request: GenerationRequest, fork_of: GenerationStream | None = None) -> GenerationStream:
        """Queue a request; called on the event loop that will read the stream.

        ``fork_of``: another completion of the same prompt (n > 1). This one waits until that one has
        computed the prompt, then starts from a copy of its cache (all but the last prompt token,
        which it runs itself to get logits of its own), instead of computing the prompt again.
        """
        request.validate(self.vocab_size, self.max_seq_len)
        seq = _Seq(request, self)
        if fork_of is not None and getattr(self.runner, "copy_prefix", None) is not None:
            seq.fork_of = fork_of._seq
        if request.constraint is not None:
            if self.grammars is None:
                raise FailedPrecondition("constraint: this model service has no tokenizer files beside its "
                                         "checkpoint, so it cannot enforce structured output")
            seq.grammar = self.grammars.compile(request.constraint)  # type: ignore[attr-defined]
        seq.loop = asyncio.get_running_loop()
        seq.stream = GenerationStream(self, seq)
        with self._cond:
            if self._failure is not None:
                raise Unavailable("the model engine failed and the service is restarting; retry shortly")
            if self._closed:
                raise Unavailable("the model service is shutting down")
            if len(self._live) >= self.max_batch_size + self.max_queue:
                raise ResourceExhausted(
                    f"{self._num_running} sequences are running and {len(self._live) - self._num_running} "
                    f"waiting, the most this server queues (--max-batch-size {self.max_batch_size} + "
                    f"--max-queue {self.max_queue}); retry later")
            self._inbox.append(seq)
            self._live.add(seq)
            self._update_gauges()
            self._cond.notify()
        return seq.stream

    def cancel(self, seq: _Seq) -> None:
        with self._cond:
            if not seq.finished and not seq.cancelled:
                seq.cancelled = True
                self._cond.notify()

    def close(self) -> None:
        """Refuse new requests (UNAVAILABLE); running ones go on."""
        with self._cond:
            self._closed = True

    def cancel_all(self) -> None:
        with self._cond:
            for seq in self._live:
                seq.cancelled = True
            self._cond.notify()

    @property
    def num_live(self) -> int:
        with self._cond:
            return len(self._live)

    # ---- lifecycle ---------------------------------------------------------------------------

    def warm_up(self, prompt_len: int = 8) -> None:
        """One real generation (prefill, sampling, a decode step) before the thread starts serving."""
        prompt_len = max(1, min(prompt_len, self.max_seq_len - 3))
        request = GenerationRequest(list(range(prompt_len)), SamplingParams(seed=0), max_new_tokens=2)
        seq = _Seq(request, self)
        seq.internal = True
        with self._cond:
            self._live.add(seq)
        self.scheduler.add(seq)
        while not seq.finished:
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
        for seq in victims:
            seq.finished = True
            self._outbox_deliver([(seq, GenerationChunk(error=message))])
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
        for seq in list(self._live):  # stop(): what still runs is cancelled
            self._finish(seq, FinishReason.CANCELLED)
        self._flush()
        self.runner.close()

    def _step(self) -> None:
        self._intake()
        for seq in self.scheduler.admit():
            self._admit(seq)
        work = self.scheduler.plan()
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
        """Take new arrivals; drop cancelled and expired sequences (their slots free this step)."""
        with self._cond:
            arrivals, self._inbox = self._inbox, []
        for seq in arrivals:
            self.scheduler.add(seq)
        now = time.monotonic()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
            elif seq.deadline is not None and now >= seq.deadline:
                self._finish(seq, None, error=DeadlineExceeded(
                    f"deadline passed after {len(seq.generated)} generated tokens"))
            elif seq.time_limit is not None and now >= seq.time_limit:
                self._finish(seq, FinishReason.TIME_LIMIT)

    def _admit(self, seq: _Seq) -> None:
        params = seq.request.sampling
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(seq.tokens, device=self.device)] = True
        generator = None if params.greedy else new_generator(params.seed)
        row = seq.row = SamplingRow(params, generator, seen, seq.request.logprobs, seq.request.top_logprobs)
        if params.penalises_counts:
            row.counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        if seq.request.min_new_tokens and seq.stop_ids:
            row.stop_token_ids = torch.tensor(sorted(seq.stop_ids), dtype=torch.long, device=self.device)
            row.min_new_tokens = seq.request.min_new_tokens
        if seq.grammar is not None:
            row.grammars = self.grammars
            row.matcher = self.grammars.matcher(seq.grammar)  # type: ignore[attr-defined]
        parent = seq.fork_of
        seq.fork_of = None  # no longer needed: do not keep a finished parent alive
        shared = seq.prompt_len - 1
        if parent is not None and shared > 0 and parent.slot >= 0 and parent.num_cached >= shared \
                and parent.tokens[:shared] == seq.tokens[:shared]:
            self.runner.copy_prefix(parent.slot, seq.slot, shared)  # type: ignore[attr-defined]
            seq.num_cached = shared
        if not seq.internal:
            self.metrics.prompt_tokens.inc(seq.prompt_len - seq.num_cached)

    def _batch(self, work: list[Work]) -> object:
        from .model import Batch  # the model core; imported here so scheduling code loads without it

        tokens = [token for item in work for token in item.token_ids]
        return Batch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=self.device),
            slots=[item.seq.slot for item in work],
            start_pos=[item.start for item in work],
            lengths=[item.length for item in work],
        )

    def _execute(self, work: list[Work]) -> None:
        """One forward over ``work``, then its tokens. A failure stays with the sequence that caused it.

        A failed forward is retried one sequence at a time (it wrote only the positions the retry
        writes again), so the sequences that did not cause it get the logits they would get alone.
        Under tensor parallelism a failed forward leaves the ranks out of step: that is fatal.
        Everything after the forward (echo logprobs, sampling) runs on this rank only and is
        confined per sequence.
        """
        echoing = [item.seq.want_prompt_logprobs and item.seq.prefilling for item in work]
        try:
            logits = self.runner.forward(self._batch(work), any(echoing))  # [n_seqs or n_tokens, vocab]
        except Exception as exc:
            if self.runner.fatal_errors:
                raise
            if len(work) > 1:
                log.warning("engine step failed; retrying its sequences one at a time",
                            error=repr(exc), sequences=len(work))
                for item in work:
                    self._execute([item])
                return
            log.exception("engine step failed for one sequence", request_id=work[0].seq.request.request_id)
            self._finish(work[0].seq, None, error=ServiceError("the model failed on this request; "
                                                               "details are in the model service log"))
            return
        self._forward_ok = True
        if any(echoing):
            rows, offset = [], 0
            for item, echo in zip(work, echoing, strict=True):
                if echo:
                    self._guarded(item.seq, self._prompt_logprobs, item, logits[offset:offset + item.length])
                offset += item.length
                rows.append(offset - 1)
            logits = logits[torch.tensor(rows, device=logits.device)]  # [n_seqs, vocab]
        Scheduler.advance(work)
        completing = [(i, item.seq) for i, item in enumerate(work) if item.completes and not item.seq.finished]
        if not completing:
            return
        rows = torch.tensor([i for i, _ in completing], device=logits.device)
        sampled = sample(logits[rows], [seq.row for _, seq in completing])
        now = time.perf_counter()
        for (_, seq), choice in zip(completing, sampled, strict=True):
            if choice.error is not None:
                log.error("sequence failed", request_id=seq.request.request_id, error=choice.error)
                self._finish(seq, None, error=ServiceError(choice.error))
            else:
                self._guarded(seq, self._accept, seq, choice.token_id, choice.logprob, choice.top_logprobs, now)

    def _guarded(self, seq: _Seq, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn`` for one sequence; if it raises, that sequence alone ends with an error."""
        try:
            fn(*args)
        except Exception:
            log.exception("sequence failed", request_id=seq.request.request_id)
            if not seq.finished:
                self._finish(seq, None, error=ServiceError("generation failed for this request; "
                                                           "details are in the model service log"))

    def _prompt_logprobs(self, item: Work, logits: torch.Tensor) -> None:
        """logits: [length, vocab] for positions start.. of a prompt chunk, each predicting the next token."""
        seq = item.seq
        count = min(item.length, seq.prompt_len - 1 - item.start)  # the last position predicts the output
        if count <= 0:
            return
        targets = torch.tensor(seq.tokens[item.start + 1:item.start + 1 + count], device=logits.device)
        chosen, alternatives = token_logprobs(logits[:count], targets, seq.request.top_logprobs)
        seq.prompt_logprobs += chosen
        seq.prompt_top_logprobs += alternatives

    def _accept(self, seq: _Seq, token_id: int, logprob: float | None, alternatives: TokenAlternatives,
                now: float) -> None:
        """A sampled token: return it or stop on it, and decide whether the sequence is finished."""
        if not seq.internal:
            if seq.last_token_time is None:
                self.metrics.time_to_first_token.observe(now - seq.arrival)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_time)
        chunk = GenerationChunk()
        if seq.last_token_time is None and seq.want_prompt_logprobs:
            chunk.prompt_logprobs = seq.prompt_logprobs
            chunk.prompt_top_logprobs = seq.prompt_top_logprobs if seq.request.top_logprobs else []
        seq.last_token_time = now
        if token_id in seq.stop_ids:
            self._finish(seq, FinishReason.STOP_TOKEN, chunk)
            return
        seq.tokens.append(token_id)
        seq.generated.append(token_id)
        if seq.row is not None:
            seq.row.observe(token_id)
        chunk.token_ids.append(token_id)
        if seq.request.logprobs:
            chunk.logprobs.append(logprob if logprob is not None else 0.0)
        if seq.request.top_logprobs:
            chunk.top_logprobs.append(alternatives)
        if not seq.internal:
            self.metrics.generated_tokens.inc()
        if len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq, FinishReason.LENGTH, chunk)
        elif len(seq.tokens) >= self.max_seq_len:
            self._finish(seq, FinishReason.CONTEXT_LIMIT, chunk)
        else:
            chunk.generated_tokens = len(seq.generated)
            self._outbox.append((seq, chunk))

    def _finish(self, seq: _Seq, reason: FinishReason | None, chunk: GenerationChunk | None = None,
                error: Exception | None = None) -> None:
        """Take ``seq`` out of the batch (its slot is free for the next step) and tell its reader."""
        self.scheduler.remove(seq)
        chunk = chunk or GenerationChunk()
        chunk.finish_reason = reason
        chunk.error = error
        chunk.prompt_tokens = seq.prompt_len
        chunk.generated_tokens = len(seq.generated)
        with self._cond:
            seq.finished = True
            self._live.discard(seq)
            self._num_running = len(self.scheduler.running)
            self._update_gauges()  # before the counter and the log line below: they never run ahead of it
        if seq.internal:
            return
        outcome = reason.value if reason is not None else type(error).__name__
        self.metrics.finished.labels(outcome).inc()
        log.info("generation finished", request_id=seq.request.request_id, finish_reason=outcome,
                 prompt_tokens=seq.prompt_len, generated_tokens=len(seq.generated),
                 seconds=round(time.perf_counter() - seq.arrival, 4))
        self._outbox.append((seq, chunk))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        self._outbox_deliver(outbox)

    @staticmethod
    def _outbox_deliver(items: list[tuple[_Seq, GenerationChunk]]) -> None:
        """Hand chunks to their event loops: one callback per loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationStream, GenerationChunk]]] = {}
        for seq, chunk in items:
            if seq.loop is not None and seq.stream is not None:
                by_loop.setdefault(seq.loop, []).append((seq.stream, chunk))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                pass

    def _refresh_gauges(self) -> None:
        with self._cond:
            self._num_running = len(self.scheduler.running)
            self._update_gauges()
        self.metrics.cached_tokens.set(sum(seq.num_cached for seq in self.scheduler.running))

    def _update_gauges(self) -> None:  # under _cond
        self.metrics.running.set(self._num_running)
        self.metrics.slots_used.set(self._num_running)
        self.metrics.queued.set(len(self._live) - self._num_running)


def _deliver(batch: list[tuple[GenerationStream, GenerationChunk]]) -> None:
    for stream, chunk in batch:
        stream._push(chunk)

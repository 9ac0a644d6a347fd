"""Render a model's Jinja chat template in worker processes, so that a hostile template never runs in
the server's own process (whose GIL would then starve health checks and every other call).

    workers = TemplateWorkers(chat.spec, processes=2, timeout=10.0)
    workers.start()                                   # at start-up: each worker compiles the template once
    rendered = workers.render(messages, add_generation_prompt)    # blocking: call it from a thread
    prompt = chat.encode(rendered)                    # the tokenizer stays in the server
    workers.close()

Each worker is a ``multiprocessing`` process of its own with its own ``Pipe``: it receives the
``TemplateSpec`` once and then only messages, and answers with a ``RenderedChat`` (or the refusal,
field and message, that the in-process renderer would raise). A render that takes longer than
``timeout`` (the template's own budget, ``chat_template.RENDER_SECONDS`` a rendering, normally ends
a hostile template first) gets its worker killed and replaced, and so does a worker that dies: its
request fails with a clear error and no other request notices. Not ``ProcessPoolExecutor``: before
Python 3.14 it cannot kill one stuck task, and a killed worker breaks the whole pool, failing every
render in flight.

Workers are spawned (a fresh interpreter, not a fork of the threaded gRPC server; like every
multiprocessing child it imports the server's main module, ``tokenizer_service/__main__.py``, which
only defines functions) from one thread that lives as long as the pool, and ask the kernel for
SIGKILL when it ends (``PR_SET_PDEATHSIG``): they die with the server even when it is killed with
SIGKILL. An idle worker also exits when its pipe closes.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from multiprocessing.connection import Connection
from typing import Any

import structlog
from prometheus_client import Counter

from llama_grpc_runtime.errors import InvalidArgument, Unavailable, short

from .chat_format import ChatPrompt
from .chat_template import JinjaChatFormat, RenderedChat, TemplateRenderer, TemplateSpec

log = structlog.get_logger()

START_SECONDS = 60.0  # a new worker (a fresh interpreter) has this long to import and compile the template


@cache
def worker_restarts() -> Counter:
    return Counter("llama_tokenizer_chat_template_worker_restarts_total",
                   "Chat template workers killed and replaced, by reason (timeout: a render ran past "
                   "--chat-template-timeout; exited: the worker died)", ["reason"])


# ---- the worker process -----------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL from the kernel when the server thread that spawned us ends (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an idle worker still exits when its pipe closes
    if os.getppid() != parent_pid:  # the server died before we asked
        os._exit(0)


def _serve(connection: Connection, spec: TemplateSpec, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    try:
        renderer = TemplateRenderer(spec)
    except Exception as exc:  # noqa: BLE001 -- reported to the server, which refuses to start
        connection.send(("failed", short(f"{type(exc).__name__}: {exc}", 300)))
        return
    connection.send(("ready", os.getpid()))
    while True:
        try:
            messages, add_generation_prompt = connection.recv()
        except (EOFError, OSError):  # the server closed the pool or is gone
            return
        try:
            reply: tuple = ("ok", renderer.rendered_chat(messages, add_generation_prompt))
        except InvalidArgument as exc:  # exceptions with their own __init__ do not pickle: send the parts
            reply = ("invalid", exc.field, exc.message.removeprefix(f"{exc.field}: "))
        except Exception as exc:  # noqa: BLE001 -- a bug, not the caller's fault: INTERNAL in the server
            reply = ("error", short(f"{type(exc).__name__}: {exc}", 300))
        try:
            connection.send(reply)
        except OSError:
            return


# ---- the server side --------------------------------------------------------------------------


class _Timeout(Exception):
    pass


class _Exited(Exception):
    pass


class _Worker:
    def __init__(self, context: Any, spec: TemplateSpec) -> None:
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, spec, os.getpid()),
                                       name="chat-template-worker", daemon=True)
        self.process.start()
        child_end.close()
        self.ready = False

    def _receive(self, deadline: float) -> tuple:
        if not self.connection.poll(max(0.0, deadline - time.monotonic())):
            raise _Timeout
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            self.process.join(1)
            raise _Exited(f"exit code {self.process.exitcode}") from None

    def wait_ready(self, deadline: float) -> None:
        if self.ready:
            return
        reply = self._receive(deadline)
        if reply[0] != "ready":
            raise _Exited(f"could not start: {reply[1]}")
        self.ready = True

    def call(self, request: tuple, timeout: float) -> tuple:
        """Send one request and wait up to ``timeout`` seconds for its reply (after the worker, if it
        is a replacement still starting, is ready)."""
        try:
            self.wait_ready(time.monotonic() + START_SECONDS)
        except _Timeout:
            raise _Exited(f"not started after {START_SECONDS:g} s") from None
        deadline = time.monotonic() + timeout
        try:
            self.connection.send(request)
        except OSError:
            self.process.join(1)
            raise _Exited(f"exit code {self.process.exitcode}") from None
        return self._receive(deadline)

    def kill(self) -> None:
        """Only the thread that holds this worker calls this (it alone uses the pipe)."""
        self.process.kill()
        self.process.join(5)
        self.connection.close()


class TemplateWorkers:
    """``processes`` render workers for one template; at most one request in each at a time."""

    def __init__(self, spec: TemplateSpec, processes: int, timeout: float) -> None:
        if processes < 1:
            raise ValueError("at least one chat template worker is needed")
        self.spec = spec
        self.processes = processes
        self.timeout = timeout
        self._context = multiprocessing.get_context("spawn")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        # Every worker is spawned from this one thread: PR_SET_PDEATHSIG fires when the spawning
        # thread ends, and this one lives as long as the pool.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="chat-template-spawner")
        # One thread per worker waits for its reply, so a request always finds an idle worker.
        self.threads = ThreadPoolExecutor(processes, thread_name_prefix="chat-template")

    def _spawn(self) -> _Worker:
        worker = self._spawner.submit(_Worker, self._context, self.spec).result()
        with self._lock:
            self._all.append(worker)
        return worker

    def start(self) -> None:
        """Start every worker and wait until each has compiled the template (or raise why not)."""
        workers = [self._spawn() for _ in range(self.processes)]
        deadline = time.monotonic() + START_SECONDS
        try:
            for worker in workers:
                worker.wait_ready(deadline)
        except (_Timeout, _Exited) as exc:
            self.close()
            raise RuntimeError(f"chat template workers did not start: {exc or 'timed out'}") from None
        for worker in workers:
            self._idle.put(worker)
        log.info("chat template workers started", pids=[worker.process.pid for worker in workers],
                 timeout=self.timeout)

    async def apply(self, chat: JinjaChatFormat, messages: list[tuple[str, str]],
                    add_generation_prompt: bool) -> ChatPrompt:
        """Checked messages -> the prompt: rendered in a worker, encoded in this pool's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.threads, lambda: chat.encode(self.render(messages, add_generation_prompt)))

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> RenderedChat:
        """What ``TemplateRenderer.rendered_chat`` returns or raises, rendered in a worker."""
        worker = self._idle.get()
        try:
            if not worker.process.is_alive():  # died while idle (killed from outside): not this request's fault
                worker = self._replace(worker, "exited", f"exit code {worker.process.exitcode} while idle")
            reply = worker.call((messages, add_generation_prompt), self.timeout)
        except _Timeout:
            worker = self._replace(worker, "timeout")
            raise InvalidArgument("messages", f"the model's chat template took more than {self.timeout:g} s on "
                                  "them (--chat-template-timeout); the render was stopped") from None
        except _Exited as exc:
            worker = self._replace(worker, "exited", str(exc))
            raise Unavailable(f"the chat template worker rendering these messages died ({exc}); it has been "
                              "replaced: retry") from None
        finally:
            self._idle.put(worker)
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "invalid":
            raise InvalidArgument(reply[1], reply[2])
        raise RuntimeError(f"chat template worker: {reply[1]}")

    def _replace(self, worker: _Worker, reason: str, detail: str = "") -> _Worker:
        worker.kill()
        with self._lock:
            if self._closed:
                return worker
            self._all.remove(worker)
        worker_restarts().labels(reason).inc()
        try:
            replacement = self._spawn()
        except Exception:  # noqa: BLE001 -- keep the dead one: its next call fails and tries again
            log.exception("chat template worker could not be replaced")
            return worker
        log.warning("chat template worker replaced", reason=reason, detail=detail, pid=worker.process.pid,
                    new_pid=replacement.process.pid)
        return replacement

    def close(self) -> None:
        """Kill every worker (renders in flight fail); the server calls this when it stops."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            # The process only: a thread may be waiting on a busy worker's pipe; it sees the pipe
            # close, and closes its end itself (closing it here could close a reused descriptor).
            worker.process.kill()
        self._spawner.shutdown(wait=False)
        self.threads.shutdown(wait=False)

"""Tensor-parallel serving from one command: rank 0 here, ranks 1..N-1 as child processes.

Rank 0 runs gRPC, the scheduler and sampling. Before each forward it broadcasts the step's batch as
two int64 tensors (the wire format): a header ``[command, n_tokens, n_seqs, all_logits, n_table_entries,
n_copied]`` and a payload of the tokens, then per sequence its start position, length and block-table
length, then every block table concatenated, then the (from, to) pairs of blocks to copy first. Each rank holds its heads' share of every KV-cache block, so
the same block tables address every rank's pool. Every rank then runs the same forward (fairscale's collectives
inside keep them in lockstep); the gathered logits are used on rank 0 only. Plain tensors work on
gloo and NCCL alike, with no pickling per step.

Failure: a child that exits is noticed within a fraction of a second (a watcher thread polls them),
rank 0 fails every request and exits non-zero; children exit when rank 0 is gone, and rank 0
broadcasts heartbeats while idle so an idle child is never left waiting for ever.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .build import DTYPES
from .model import Batch
from .runner import make_batch
from .scheduler import Work

log = structlog.get_logger()

HEARTBEAT, FORWARD, STOP = 0, 1, 2
HEARTBEAT_INTERVAL_S = 5.0


@dataclass(frozen=True)
class LoadOptions:
    """What every rank needs to build its shard (picklable: it crosses the spawn)."""

    checkpoint: str | None
    device: str
    dtype: str
    max_batch_size: int
    max_seq_len: int | None
    seed: int = 1
    log_level: str = "info"
    quantize: str | None = None  # None: a GGUF file's own quantisation, other checkpoints as stored
    kv_cache_tokens: int | None = None  # see build(): None = max_batch_size slots, 0 = the memory budget
    kv_block_size: int = 16
    compile: bool = False
    packed_activations: str = "bfloat16"
    compile_mode: str = "default"  # model.COMPILE_MODES
    threads: int = 0  # --threads: intra-op CPU threads of all ranks together (0: the cores this process may use)

    def build(self, device: str | None = None) -> Any:
        from .build import build

        return build(self.checkpoint, device=device or self.device, dtype=DTYPES[self.dtype],
                     max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len, seed=self.seed,
                     quantize=self.quantize, kv_cache_tokens=self.kv_cache_tokens,
                     kv_block_size=self.kv_block_size, compile=self.compile,
                     packed_activations=self.packed_activations, compile_mode=self.compile_mode)


def _comm_device(model_device: torch.device) -> torch.device:
    return model_device if model_device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors


def send_plan(command: int, batch: Batch | None = None, all_logits: bool = False,
              device: torch.device = torch.device("cpu")) -> None:
    """Rank 0: tell every rank what comes next."""
    if batch is None:
        dist.broadcast(torch.tensor([command, 0, 0, 0, 0, 0], dtype=torch.long, device=device), src=0)
        return
    tables = batch.block_tables
    if any(isinstance(table, int) for table in tables):
        raise ValueError("tensor-parallel batches carry block tables, not slot numbers")
    n_tokens, n_seqs = batch.tokens.numel(), len(batch.lengths)
    flat = [block for table in tables for block in table]
    copies = [block for pair in batch.block_copies for block in pair]
    dist.broadcast(torch.tensor([command, n_tokens, n_seqs, int(all_logits), len(flat), len(copies)],
                                dtype=torch.long, device=device), src=0)
    layout = torch.tensor([*batch.start_pos, *batch.lengths, *(len(table) for table in tables), *flat, *copies],
                          dtype=torch.long)
    dist.broadcast(torch.cat([batch.tokens.to(device, torch.long), layout.to(device)]), src=0)


def receive_plan(device: torch.device) -> tuple[int, Batch | None, bool]:
    """Ranks 1..N-1: (command, Batch or None, all_logits)."""
    header = torch.empty(6, dtype=torch.long, device=device)
    dist.broadcast(header, src=0)
    command, n_tokens, n_seqs, all_logits, n_entries, n_copied = header.tolist()
    if command != FORWARD:
        return command, None, False
    payload = torch.empty(n_tokens + 3 * n_seqs + n_entries + n_copied, dtype=torch.long, device=device)
    dist.broadcast(payload, src=0)
    layout = payload[n_tokens:].tolist()
    table_lens = layout[2 * n_seqs:3 * n_seqs]
    flat, copied = layout[3 * n_seqs:3 * n_seqs + n_entries], layout[3 * n_seqs + n_entries:]
    tables, offset = [], 0
    for length in table_lens:
        tables.append(flat[offset:offset + length])
        offset += length
    batch = Batch(tokens=payload[:n_tokens], block_tables=tables, start_pos=layout[:n_seqs],
                  lengths=layout[n_seqs:2 * n_seqs], block_copies=list(zip(copied[::2], copied[1::2], strict=True)))
    return command, batch, bool(all_logits)


def _die_with_parent() -> None:
    """Exit when rank 0 is gone (even killed by SIGKILL) instead of lingering in a collective.

    A polling thread rather than PR_SET_PDEATHSIG: that signal fires when the *thread* that spawned
    us exits, and rank 0 spawns from its short-lived load thread. Collectives release the GIL, so the
    thread runs while the main one waits in a broadcast.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watcher", daemon=True).start()


def worker_main(rank: int, world_size: int, init_method: str, options: LoadOptions) -> None:
    """A rank other than 0: load its shard, then run whatever forward rank 0 broadcasts, until STOP."""
    _die_with_parent()  # SIGTERM keeps its default action: it ends the process even inside a collective
    from llama_grpc_runtime.logs import configure_logging

    from .distributed import init_distributed, rank_device, shutdown, use_cpu_threads

    configure_logging("model", options.log_level)
    structlog.contextvars.bind_contextvars(rank=rank)
    device = rank_device(rank, options.device)
    use_cpu_threads(device, options.threads, world_size)
    init_distributed(rank, world_size, init_method, device)
    loaded = options.build(device)
    model = loaded.model
    comm = _comm_device(model.device)
    log.info("rank ready", world_size=world_size, device=str(model.device))
    while True:
        command, batch, all_logits = receive_plan(comm)
        if command == STOP:
            break
        if command == FORWARD:
            with torch.inference_mode():
                model.forward(batch, all_logits=all_logits)
    log.info("rank stopping")
    shutdown()


class TensorParallelRunner:
    """Rank 0's side: starts the other ranks, broadcasts each plan, runs its own shard's forward."""

    fatal_errors = True  # after a failed collective the ranks are out of step for good
    heartbeat_interval = HEARTBEAT_INTERVAL_S

    def __init__(self, world_size: int, options: LoadOptions,
                 on_rank_death: Callable[[BaseException], None]) -> None:
        self.world_size = world_size
        self.options = options
        self.on_rank_death = on_rank_death
        self.processes: list[Any] = []
        self.model: Any = None
        self.device = torch.device("cpu")
        self._comm = torch.device("cpu")
        self._closing = False

    def start(self) -> Any:
        """Spawn ranks 1..N-1, join the group as rank 0, build this rank's shard; return it."""
        from .distributed import free_port, init_distributed, rank_device, use_cpu_threads

        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        for rank in range(1, self.world_size):
            process = context.Process(target=worker_main, name=f"rank-{rank}", daemon=True,
                                      args=(rank, self.world_size, init_method, self.options))
            process.start()
            self.processes.append(process)
        threading.Thread(target=self._watch, name="rank-watcher", daemon=True).start()
        device = rank_device(0, self.options.device)
        use_cpu_threads(device, self.options.threads, self.world_size)
        init_distributed(0, self.world_size, init_method, device)
        loaded = self.options.build(device)
        self.model = loaded.model
        self.device = self.model.device
        self._comm = _comm_device(self.device)
        return loaded

    def _watch(self) -> None:
        while not self._closing:
            for rank, process in enumerate(self.processes, start=1):
                if process.exitcode is not None and not self._closing:
                    self._closing = True
                    self.on_rank_death(RuntimeError(f"tensor-parallel rank {rank} exited with code {process.exitcode}"))
                    return
            time.sleep(0.2)

    def forward(self, work: list[Work], all_logits: bool) -> torch.Tensor:
        batch = make_batch(work, self.device)
        send_plan(FORWARD, batch, all_logits, self._comm)
        with torch.inference_mode():
            return self.model.forward(batch, all_logits=all_logits)

    def heartbeat(self) -> None:
        send_plan(HEARTBEAT, device=self._comm)

    def close(self) -> None:
        """Graceful: every rank leaves its loop, then the processes are reaped."""
        if self._closing:
            return self.abort()
        self._closing = True
        try:
            send_plan(STOP, device=self._comm)
        except Exception as exc:  # a rank already gone; abort() reaps the rest
            log.warning("could not stop ranks cleanly", error=repr(exc))
        for process in self.processes:
            process.join(timeout=10)
        self.abort()

    def abort(self) -> None:
        """Kill whatever rank still runs (it may be blocked in a collective that cannot finish)."""
        self._closing = True
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        sys.stderr.flush()

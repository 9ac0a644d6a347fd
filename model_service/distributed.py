"""Process groups for tensor parallelism: NCCL on CUDA, gloo on CPU, fairscale's model-parallel group on top.

- ``init_distributed`` is what each of N rank processes calls;
- ``ensure_initialized`` gives a lone process a 1-rank group, so tp=1 needs no set-up by callers;
- ``launch`` starts N rank processes running one function and collects what each returns.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _init_model_parallel(world_size: int) -> None:
    # fairscale prints three lines on rank 0; they would land in our structured logs.
    with contextlib.redirect_stdout(io.StringIO()):
        fs_init.initialize_model_parallel(world_size)


def init_distributed(rank: int, world_size: int, init_method: str, device: str | torch.device) -> None:
    """Join an N-rank group (every rank is one tensor-parallel shard) and set up fairscale on it."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size)
    _init_model_parallel(world_size)


def ensure_initialized() -> None:
    """Use the existing group if there is one; else start a 1-process gloo group in this process.

    At tp=1 fairscale's layers never communicate, so gloo serves CUDA models too. The group uses an
    in-process store, so it needs no port and cannot collide with anything.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        _init_model_parallel(dist.get_world_size())


def tp_rank() -> int:
    return fs_init.get_model_parallel_rank()


def tp_size() -> int:
    return fs_init.get_model_parallel_world_size()


def shutdown() -> None:
    """Leave the groups (tests and tools that build several models in one process call this)."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_device(rank: int, device: str) -> str:
    """Rank r of a CUDA group uses GPU r of this host; CPU ranks all use the CPU."""
    return f"cuda:{rank}" if torch.device(device).type == "cuda" else device


def _rank_main(rank: int, world_size: int, init_method: str, device: str, fn: Callable[..., Any],
               args: tuple, results: Any) -> None:
    try:
        init_distributed(rank, world_size, init_method, rank_device(rank, device))
        # Plain pickle: the queue's torch reducer would share tensor storage through file descriptors
        # that vanish when this process exits.
        results.put((rank, True, pickle.dumps(fn(rank, *args))))
    except BaseException:  # report any failure to the parent rather than hanging it
        results.put((rank, False, traceback.format_exc()))
        raise
    finally:
        shutdown()


def cpu_threads(requested: int = 0, world_size: int = 1) -> int:
    """Intra-op threads for one rank: ``requested`` (``--threads``) split between ``world_size`` ranks;
    by default ``OMP_NUM_THREADS`` where it is set, else every core this process may use (its CPU
    affinity, capped by a cgroup CPU limit such as a Kubernetes ``resources.limits.cpu``), split
    likewise; at least 1.

    More threads than cores the process gets is the slow case to avoid: an OpenMP thread that loses
    its core to another process stalls every parallel kernel until it runs again.
    """
    total = requested or _omp_num_threads() or available_cpus()
    return max(1, total // world_size)


def use_cpu_threads(device: str | torch.device, requested: int = 0, world_size: int = 1) -> None:
    """Give this process's CPU kernels ``cpu_threads(requested, world_size)`` threads (nothing on a GPU)."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(cpu_threads(requested, world_size))


def _omp_num_threads() -> int:
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        return 0


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its affinity mask, and no more than the cgroup v2 quota allows."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota = cgroup_quota(cgroup_cpu_max.read_text())
    except OSError:  # no cgroup v2 file: no limit known
        quota = None
    return max(1, min(cores, quota) if quota is not None else cores)


def cgroup_quota(cpu_max: str) -> int | None:
    """Whole CPUs a cgroup v2 ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD": no limit) allows, rounded
    down but at least 1; None without a limit or for text that is not that format."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, quota // period) if quota > 0 and period > 0 else None


def launch(world_size: int, fn: Callable[..., Any], *args: Any, device: str = "cpu",
           timeout_s: float = 600.0) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` fresh rank processes; return their results in rank order.

    ``fn`` must be importable (a module-level function) and its result picklable. A failure on any
    rank raises here with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    # Each rank gets an equal share of the host's cores instead of all of them (oversubscription
    # makes gloo ranks run several times slower).
    threads = cpu_threads(0, world_size)
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        procs = [ctx.Process(target=_rank_main, args=(rank, world_size, init_method, device, fn, args, results),
                             daemon=True) for rank in range(world_size)]
        for proc in procs:
            proc.start()
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world_size:
            rank, ok, value = _get(results, procs, timeout_s)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [outputs[rank] for rank in range(world_size)]


def _get(results: Any, procs: list, timeout_s: float) -> tuple[int, bool, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not results.empty():
            return results.get()
        dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
        if dead and results.empty():
            raise RuntimeError(f"rank process exited with code {dead[0].exitcode} without reporting")
        time.sleep(0.05)
    raise TimeoutError(f"rank processes did not finish within {timeout_s} s")

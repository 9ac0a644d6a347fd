"""How many CPU threads the model's kernels get: --threads, or every core the process may use (its
affinity, capped by a cgroup v2 CPU limit such as a Kubernetes limits.cpu), split between ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_grpc_devtools.process import ServiceProcess
from model_service.distributed import available_cpus, cgroup_quota, cpu_threads


@pytest.mark.parametrize(("text", "cpus"), [
    ("max 100000\n", None),  # no limit
    ("400000 100000\n", 4),  # limits.cpu: 4
    ("250000 100000", 2),  # 2.5 CPUs: two whole ones
    ("50000 100000", 1),  # half a CPU: still one thread
    ("", None), ("max", None), ("a b", None), ("0 100000", None), ("-1 100000", None),
])
def test_cgroup_cpu_max_is_read_as_whole_cpus(text, cpus):
    assert cgroup_quota(text) == cpus


def test_available_cpus_is_the_affinity_capped_by_the_cgroup_limit(tmp_path: Path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == affinity
    cpu_max.write_text("100000 100000\n")
    assert available_cpus(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 8) * 100000} 100000\n")  # a limit above the cores: the cores
    assert available_cpus(cpu_max) == affinity
    assert available_cpus(tmp_path / "missing") == affinity


def test_threads_are_split_between_ranks(monkeypatch):
    assert cpu_threads(6, 2) == 3 and cpu_threads(3, 2) == 1 and cpu_threads(1, 4) == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(0, 1) == available_cpus()
    # OMP_NUM_THREADS, the usual knob, is the default where it is set; --threads wins over it.
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_threads(0, 1) == 5 and cpu_threads(0, 2) == 2 and cpu_threads(1, 1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert cpu_threads(0, 1) == available_cpus()


def test_the_service_runs_with_the_threads_asked_for(tiny_checkpoints):
    # The flag's environment twin; 3, a count neither the default (the cores) nor OMP_NUM_THREADS gives here.
    env = {"LLAMA_MODEL_THREADS": "3", "OMP_NUM_THREADS": "1"}
    with ServiceProcess("model_service", "--checkpoint", str(tiny_checkpoints["meta"]), "--max-batch-size", "1",
                        "--max-seq-len", "64", env=env) as proc:
        proc.wait_healthy(timeout=120)
        assert proc.stop() == 0, proc.log_text()
    ready = [json.loads(line) for line in proc.log_text().splitlines() if '"model ready"' in line]
    assert ready and ready[0]["threads"] == 3, proc.log_text()


def test_negative_threads_are_refused_naming_the_flag():
    done = subprocess.run([sys.executable, "-m", "model_service", "--threads", "-1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--threads must be >= 0" in done.stderr

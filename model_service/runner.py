"""Runners: turn a scheduled step (``Work`` items) into the model's tensors and run the forward.

The engine hands a runner the scheduler's plan for one step; the runner builds the ``Batch``
(tokens, block tables, positions) on its device and returns the logits. ``LocalRunner`` runs the
whole model in this process; ``tp_worker.TensorParallelRunner`` also broadcasts the batch to the
other tensor-parallel ranks in its wire format.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .model import Batch, Transformer
from .scheduler import Work


def make_batch(work: list[Work], device: torch.device) -> Batch:
    """One step's tokens and attention layout (each sequence's block table and positions)."""
    tokens = [token for item in work for token in item.token_ids]
    return Batch(
        tokens=torch.tensor(tokens, dtype=torch.long, device=device),
        block_tables=[list(item.block_table) for item in work],
        start_pos=[item.start for item in work],
        lengths=[item.length for item in work],
        block_copies=[pair for item in work for pair in item.block_copies],
    )


class Runner(Protocol):
    """Runs the model's forward for the engine: in this process, or on every tensor-parallel rank."""

    device: torch.device
    fatal_errors: bool  # a failed step leaves the runner unusable (ranks out of step)
    heartbeat_interval: float | None  # call heartbeat() when idle this long (None: never)

    def forward(self, work: list[Work], all_logits: bool) -> torch.Tensor: ...
    def heartbeat(self) -> None: ...
    def close(self) -> None: ...  # from the step thread, on its way out
    def abort(self) -> None: ...  # from any thread, when the step thread is stuck


class LocalRunner:
    """The whole model in this process."""

    fatal_errors = False
    heartbeat_interval = None

    def __init__(self, model: Transformer, device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)

    def forward(self, work: list[Work], all_logits: bool) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward(make_batch(work, self.device), all_logits=all_logits)

    def heartbeat(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

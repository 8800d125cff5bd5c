"""Several processes on one or more machines (`torchrun`, `accelerate launch`): which process this is,
and the rule that only the main one writes.

Training itself is the Trainer's DDP (through accelerate). Around it, every process prepares the data
(the main one first, so the others read its tokenisation cache), loads the model and trains; only the
main process takes the output folder's lock, writes logs, checkpoints, the adapter, the manifest and the
report, and evaluates. The other processes end when training ends.

Decisions that stop training are taken by all processes together (`max_over_processes`, once per optimizer
step): a signal or a non-finite loss on any one process stops every process after the same step.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Processes:
    """This process's place in the run, from the launcher's environment (RANK, WORLD_SIZE, ...)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """'rank 1 of 2' for messages; empty for a single process."""
        return f"rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""


def processes() -> Processes:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    return Processes(rank=int(env.get("RANK", "0") or 0), local_rank=int(env.get("LOCAL_RANK", "0") or 0),
                     world_size=world, local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1") or 1))


def _state():
    """accelerate's process state (it starts the process group: gloo on CPUs, nccl on GPUs)."""
    from accelerate import PartialState

    return PartialState()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. tokenising into the cache); the others after it."""
    if processes().world_size == 1:
        yield
        return
    with _state().main_process_first():
        yield


def wait_for_everyone() -> None:
    if processes().world_size > 1:
        _state().wait_for_everyone()


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (each process must call it at the same point)."""
    if processes().world_size == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=_state().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_from_processes(obj) -> list:
    """Every process's `obj` (picklable), in rank order (each process must call it at the same point)."""
    if processes().world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * processes().world_size
    dist.all_gather_object(gathered, obj)
    return gathered

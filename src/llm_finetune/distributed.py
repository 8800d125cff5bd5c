"""Several processes on one or more machines (`torchrun`, `accelerate launch`): which process this is,
and the rule that only the main one writes.

Training itself is the Trainer's DDP (through accelerate). Around it, every process prepares the data
(the main one first, so the others read its tokenisation cache), loads the model and trains; only the
main process takes the output folder's lock, writes logs, checkpoints, the adapter, the manifest and the
report, and evaluates. The other processes end when training ends.

Decisions that stop training are taken by all processes together (`max_over_processes`, once per optimizer
step): a signal or a non-finite loss on any one process stops every process after the same step.

`train --nproc N` starts the launcher itself (`start_processes`), and every run checks the processes it got
against those asked for (`launch_problems`).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .errors import ConfigError


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


# Set by `train --nproc N` for the processes it starts: each checks it is one of N.
NPROC_ENV = "LLM_FINETUNE_NPROC"


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


def start_processes(nproc: int | None, argv: list[str]) -> int | None:
    """`train --nproc N` outside a launcher: run `argv` (the command line, `train ...`) under torchrun with N
    processes and return its exit status. Otherwise None, once the processes this run got are checked
    (an error if they are not the N asked for; a warning where accelerate quietly started one)."""
    if nproc and nproc > 1 and processes().world_size == 1:
        return launch(nproc, _without_nproc(argv[1:]))
    error, warning = launch_problems(nproc)
    if error:
        raise ConfigError(error)
    if warning:
        print(f"llm-finetune train: warning: {warning}", file=sys.stderr)
    return None


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, train_args: list[str]) -> int:
    """`llm-finetune train --nproc N`: the same command under torchrun, N processes on this machine (gloo on
    CPUs, nccl on GPUs), and its exit status. A terminal's Ctrl-C reaches every process itself; a SIGTERM sent
    to this command is passed on to the launcher, which passes it to each process (see resume.StopOnSignal)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llm_finetune", "train", *train_args]
    child = subprocess.Popen(argv, env={**os.environ, NPROC_ENV: str(nproc)})
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def launch_problems(nproc: int | None = None) -> tuple[str | None, str | None]:
    """(error, warning) about the processes this run got, against the ones it was started for (`train --nproc`)."""
    got, env = processes(), os.environ
    asked = nproc or env.get(NPROC_ENV)
    if asked and int(asked) != got.world_size:
        return (f"train --nproc {asked}: the launcher started {got.world_size} process(es) instead; check the "
                "torchrun / accelerate arguments"), None
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and importlib.util.find_spec("deepspeed") is None:
        return ("this run was launched with a DeepSpeed config, and DeepSpeed is not installed: pip install "
                "'llm-finetune[deepspeed]' (with torch installed first), or launch with a DDP or FSDP config "
                "(config/accelerate/)"), None
    if got.world_size == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env:
        return None, ("accelerate launch --cpu started ONE process, whatever --num_processes says (accelerate runs "
                      "several CPU processes only through mpirun): this run trains as a single process. For N CPU "
                      "processes use `llm-finetune train --nproc N` or `torchrun --nproc_per_node N -m llm_finetune "
                      "train ...`")
    return None, None

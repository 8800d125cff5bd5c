"""Interruption and resume: which checkpoint to continue from, whether the run is still the same run,
and stopping cleanly on Ctrl-C / SIGTERM.

The Trainer restores model, optimizer, scheduler, RNG states and the data position from a checkpoint
folder (`resume_from_checkpoint`); what it lacks is added here:
- `latest_checkpoint` picks the newest checkpoint that is complete: its trainer state parses and every
  safetensors file's header and length agree, so a checkpoint cut short (a kill during the write, a
  full disk) is skipped with the reason and never loaded in part;
- each checkpoint carries the run's identity (resolved config and data fingerprints, `RunIdentity`), and
  a resume with a changed config or changed data says what changed and refuses unless allowed;
- `StopOnSignal`: the first Ctrl-C / SIGTERM finishes the current optimizer step, saves a checkpoint and
  stops; a second one exits at once;
- `SpikeGuard` (train.spike_guard): a step whose loss jumps far above the recent mean is never applied;
  the run rolls back to the newest checkpoint and skips that step's batch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .artifacts import CHECKPOINT_STAGING, RUN_IDENTITY, RUN_LOCK, SPIKE_GUARD_STATE, read_json
from .callbacks import CheckpointState, MetricsLogger
from .config import RunConfig
from .distributed import max_over_processes, processes, wait_for_everyone
from .errors import ConfigError, DiskFull, TrainingDiverged
from .manifest import write_json

# Keys that may change between a run and its resume without changing what is trained.
_MAY_CHANGE = ("output.", "eval.", "train.logging_steps", "train.save_steps", "train.save_total_limit",
               "train.num_threads", "train.max_steps", "model.allow_pickle", "train.spike_")


def checkpoint_problem(folder: Path) -> str | None:
    """None when the checkpoint is complete, else what is wrong with it."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as e:
        return f"{state.name} unreadable ({type(e).__name__})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no safetensors weights"
    for f in weights:
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + size + end:
                return f"{f.name} is {f.stat().st_size} bytes, its header says {8 + size + end} (cut short)"
        except (OSError, ValueError, struct.error, KeyError, TypeError) as e:
            return f"{f.name} is damaged ({type(e).__name__})"
    return None


def checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint-N folders in out_dir, newest (highest step) first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def partial_checkpoints(out_dir: Path) -> list[Path]:
    """Staging folders of checkpoints whose write never finished (a run killed while saving)."""
    return sorted(p for p in Path(out_dir).glob(f".checkpoint-*{CHECKPOINT_STAGING}") if p.is_dir())


def latest_checkpoint(out_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint, and a line for each newer one skipped (with its reason)."""
    skipped = []
    for folder in checkpoints(out_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder}: {problem}; skipped")
    return None, skipped


def run_identity(cfg, fingerprints: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same run: its resolved config, its data, and how many processes split its batch."""
    return {"config": cfg.to_dict(), "data": fingerprints, "world_size": processes().world_size}


def _flat(config: dict) -> dict[str, Any]:
    """{"train": {"seed": 3}} -> {"train.seed": 3}: the config's sections and keys, as the CLI names them."""
    return {f"{section}.{key}": value for section, keys in config.items() for key, value in keys.items()}


_SPLIT = ("train.batch_size", "train.gradient_accumulation_steps")


def _split(flat: dict, world_size: int) -> tuple[int, int, int]:
    return world_size, flat.get(_SPLIT[0], 1), flat.get(_SPLIT[1], 1)


def identity_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changes, notes): a human line for every config key or data fingerprint that differs (keys that may
    change are ignored), and notes for what changed without changing the training. The split of the global
    batch (processes x batch_size x accumulation) is such a note while the global batch stays the same:
    every optimizer step trains the same examples with the same loss."""
    lines, notes = [], []
    old, new = _flat(saved.get("config", {})), _flat(current.get("config", {}))
    was, now = _split(old, saved.get("world_size", 1)), _split(new, current.get("world_size", 1))
    same_global = math.prod(was) == math.prod(now)
    if was != now and same_global:
        notes.append("the global batch of {} is split differently: {} process(es) x batch {} x accumulation {} -> "
                     "{} x {} x {}".format(math.prod(now), *was, *now))
    defaults = _flat(RunConfig().to_dict())
    for key in sorted(set(old) | set(new)):
        if key.startswith(_MAY_CHANGE) or (same_global and key in _SPLIT) or old.get(key) == new.get(key):
            continue
        if key not in old and new.get(key) == defaults.get(key):  # a key newer than the checkpoint, at its default
            continue
        lines.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if not same_global:
        lines.append("global batch: {} process(es) x batch {} x accumulation {} = {} -> {} x {} x {} = {} (keep "
                     "the global batch: change the accumulation with the process count)"
                     .format(*was, math.prod(was), *now, math.prod(now)))
    if saved.get("data") != current.get("data"):
        lines.append("data: the training data's fingerprint changed (a file was edited, added or removed)")
    return lines, notes


def resume_point(out_dir: Path, resume: str | bool, identity: dict, allow_changed: bool) -> tuple[Path, list[str]]:
    """The checkpoint to continue from (`resume` True: the newest complete one in out_dir; a path: that
    one), and notes for the log. Refuses (ConfigError) with what changed unless `allow_changed`."""
    notes: list[str] = []
    if resume is True:
        folder, notes = latest_checkpoint(out_dir)
        if folder is None:
            raise ConfigError(f"--resume: no complete checkpoint in {out_dir}" + (f" ({'; '.join(notes)})" if notes
                              else "") + "; start a new run without --resume")
    else:
        folder = Path(resume)
        problem = checkpoint_problem(folder) if folder.is_dir() else "it does not exist"
        if problem:
            raise ConfigError(f"--resume {folder}: not a complete checkpoint: {problem}")
    saved = read_json(folder / RUN_IDENTITY)
    if saved is None:
        notes.append(f"{folder} records no run identity (written by another tool?); config and data not compared")
    else:
        changed, same_training = identity_changes(saved, identity)
        notes += same_training
        if changed and not allow_changed:
            raise ConfigError(f"--resume {folder}: the run changed since this checkpoint:\n  " + "\n  ".join(changed)
                              + "\nresume with the config and data it was trained with, or pass --allow-changed")
        notes += [f"resumed with a change (--allow-changed): {c}" for c in changed]
    return folder, notes


def unfinished_run(out_dir: Path, adapter_name: str) -> str | None:
    """Why out_dir holds an unfinished run (checkpoints newer than its final adapter, or no adapter), or None."""
    found = checkpoints(out_dir)
    if not found:
        return None
    final = Path(out_dir) / adapter_name
    if not final.exists():
        return f"{found[0].name} and no final {adapter_name}"
    if found[0].stat().st_mtime > final.stat().st_mtime:
        return f"{found[0].name} is newer than its final {adapter_name}"
    return None


def check_fresh_start(out_dir: Path, adapter_name: str, overwrite: bool) -> list[Path]:
    """A new run into a folder with an unfinished one refuses (ConfigError) unless `overwrite`; returns the
    old checkpoints to remove once the folder is locked."""
    why = unfinished_run(out_dir, adapter_name)
    if why is None:
        return []
    if not overwrite:
        raise ConfigError(f"output.dir {out_dir} holds an unfinished run ({why}): continue it with --resume, or "
                          "start over with --overwrite (its checkpoints are removed)")
    return checkpoints(out_dir)


def remove_checkpoints(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_full(error: BaseException, out_dir: Path) -> DiskFull | None:
    """For a save that failed for lack of space (its staging folder is already removed: the checkpoint never
    got its name): say how much space a checkpoint needs, how much is free, and which checkpoint is intact.
    None for other errors."""
    if not (isinstance(error, OSError) and error.errno == errno.ENOSPC):
        return None
    complete, _ = latest_checkpoint(out_dir)
    needed = f"about {_size(complete) / 1e6:.1f} MB (the size of {complete.name})" if complete else \
        "the size of the adapter, its optimizer state and the trainer state"
    free = shutil.disk_usage(out_dir).free / 1e6
    kept = f"; {complete.name} is intact (resume from it with --resume once there is room)" if complete else ""
    return DiskFull(f"no space left on the device of {out_dir} while writing a checkpoint: it needs {needed}, "
                    f"{free:.1f} MB are free. The half-written checkpoint was removed{kept}.")


class RunLock:
    """One run per output folder. An OS file lock (flock): a second run refuses, naming the holder, and a
    run that crashed or was killed holds nothing (the OS drops its lock with the process)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RUN_LOCK
        self.handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"output.dir {self.path.parent}: another run ({holder}) is training into this folder; "
                              "wait for it to end, or set another output.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def claim_run_folder(cfg, identity: dict, resume: str | bool | None, allow_changed: bool, overwrite: bool
                     ) -> tuple[Path | None, RunLock | None, list[str]]:
    """The run folder, before anything is written into it: the checkpoint to resume from, or a fresh start
    checked; the folder locked by the main process (the first write); the checkpoints a fresh start replaces
    and the staging folders of a save that was killed removed. Returns (checkpoint to resume from, the lock,
    notes for the log); on a failure the lock is released."""
    out_dir, notes, stale, resume_from = Path(cfg.output.dir), [], [], None
    if resume:
        resume_from, notes = resume_point(out_dir, resume, identity, allow_changed)
    else:
        stale = check_fresh_start(out_dir, cfg.output.adapter_name, overwrite)
    main = processes().is_main  # several processes: only the main one writes into the run folder
    lock = RunLock(out_dir).acquire() if main else None
    try:
        partial = partial_checkpoints(out_dir)
        notes += [f"{p.name}: a checkpoint whose write never finished (the run was killed while saving); removed"
                  for p in partial]
        if main:
            remove_checkpoints(stale + partial)
        wait_for_everyone()
    except BaseException:
        if lock:
            lock.release()
        raise
    return resume_from, lock, notes


class RunIdentityState(CheckpointState):
    """Writes the run identity (resolved config, data fingerprints) into every checkpoint, for a resume to
    compare with."""

    def __init__(self, identity: dict):
        self.identity = identity

    def save_state(self, folder: Path) -> None:
        write_json(folder / RUN_IDENTITY, self.identity)


class StopOnSignal(TrainerCallback):
    """First Ctrl-C / SIGTERM: finish the optimizer step, save a checkpoint, stop. Second: exit at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NAMES = {s.name for s in SIGNALS}
    ECHO_S = 2.0  # several processes: a repeat this soon is the launcher passing the first signal on

    def __init__(self):
        self.received: str | None = None
        self.at = 0.0
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.received and processes().world_size > 1 and time.monotonic() - self.at < self.ECHO_S:
            return  # the same Ctrl-C again, passed on by the launcher (torchrun forwards what it receives)
        if self.received:  # the second one: no checkpoint, nothing else written
            self.restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped at once")
        self.received = signal.Signals(signum).name
        self.at = time.monotonic()

    def restore(self):
        """Put back the handlers that were there before training (idempotent)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.previous:  # already installed (training continues after a loss-spike rollback)
            return
        try:
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: signals cannot be caught here
            self.previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        # Every process decides together, once per step: a signal that reached only one of them (kill of one
        # rank) stops them all after this same step, with one checkpoint.
        signum = max_over_processes(int(signal.Signals[self.received]) if self.received in self.NAMES else 0)
        if signum:
            self.received = self.received or f"{signal.Signals(signum).name} (sent to another process of the run)"
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


class LossSpike(Exception):
    """Raised by SpikeGuard out of Trainer.train to roll back: `fit` continues from `checkpoint`."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class SpikeGuard(CheckpointState):
    """train.spike_guard. Before each optimizer step, the step's loss (all processes' mean) is compared with
    the mean of the previous `window` steps; above `factor` times that, the step is a spike: its update is
    never applied. The run rolls back to the newest checkpoint (model, optimizer, scheduler, RNG and data
    position: an ordinary resume) and, when the replay reaches the spike's step again, drops that step's
    gradients, so its batch is skipped; with no checkpoint yet the batch is skipped where it is. Each spike
    is named (step, loss, mean, rows) in the log and as a "loss_spike" event in metrics.jsonl; more than
    `max_skips` stop the run. The guard's window and skipped steps travel in checkpoints, so a resumed run
    decides exactly as the uninterrupted one."""

    def __init__(self, trainer, factor: float, window: int, max_skips: int):
        self.trainer, self.factor, self.window, self.max_skips = trainer, factor, window, max_skips
        self.report = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsLogger)).event
        self.recent: list[list] = []  # [step, loss] of the last `window` steps applied
        self.skipped: dict[str, dict] = {}  # str(step) -> the spike's record (JSON keys are strings)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        if str(step) in self.skipped:  # the replay reached the spike: its batch is not applied
            self._drop_update(model)
            return
        loss = self.trainer.step_loss()
        mean = sum(x for _, x in self.recent) / len(self.recent) if self.recent else 0.0
        if len(self.recent) < self.window or loss <= self.factor * mean:
            self.recent = (self.recent + [[step, loss]])[-self.window:]
            return
        rows = self.trainer.step_sources()
        if len(self.skipped) >= self.max_skips:
            raise TrainingDiverged(
                f"step {step}: loss {loss:.4g} is {loss / mean:.1f}x the mean of the last {self.window} steps "
                f"({mean:.4g}): one spike more than the guard skips (train.spike_max_skips={self.max_skips}; "
                f"skipped: step {', '.join(self.skipped)}); {self.trainer.named_examples()}")
        checkpoint, _ = latest_checkpoint(Path(args.output_dir))
        record = {"event": "loss_spike", "step": step, "loss": loss, "recent_mean": mean, "rows": rows,
                  "action": f"rolled back to {checkpoint.name}, batch skipped" if checkpoint else
                  "no checkpoint yet: batch skipped where it is"}
        self.skipped[str(step)] = record
        self.report(record)
        if checkpoint is None:
            self._drop_update(model)
            return
        raise LossSpike(f"loss spike at step {step} ({loss:.4g}, {loss / mean:.1f}x the recent mean)", checkpoint)

    def _drop_update(self, model) -> None:
        """No update from this step: without gradients the optimizer leaves every weight and its state as
        they are (the learning-rate schedule still counts the step)."""
        for p in (model or self.trainer.model).parameters():
            p.grad = None

    def save_state(self, folder: Path) -> None:
        write_json(folder / SPIKE_GUARD_STATE, {"recent": self.recent, "skipped": self.skipped})

    def load_state(self, folder: Path) -> None:
        saved = read_json(folder / SPIKE_GUARD_STATE) or {}
        self.recent = saved.get("recent", [])
        self.skipped = {**saved.get("skipped", {}), **self.skipped}  # a rollback keeps the spike it rolls back from

"""The training loop's callbacks: progress, metrics.jsonl, the stop on a non-finite gradient, AdaLoRA's
rank allocation, and `CheckpointState`, the callbacks whose state travels in checkpoints."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, TrainerCallback

from .artifacts import ADALORA_STATE
from .config import RunConfig
from .distributed import gather_from_processes, max_over_processes, processes
from .errors import MethodError, TrainingDiverged

log = logging.getLogger("llm_finetune")


def adalora_model(model):
    """The AdaLoraModel inside a PEFT model (it adds the regulariser and allocates ranks), else None."""
    base = getattr(model, "base_model", None)
    return base if type(base).__name__ == "AdaLoraModel" else None




class ProgressBar(TrainerCallback):
    """step/total, ETA (tqdm), the last logged loss and the training throughput in tokens/s."""

    def __init__(self):
        self.bar = None
        self.loss = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bar is not None:  # training continues after a loss-spike rollback
            self.bar.close()
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
            self.start, self.start_tokens, self.start_step = time.time(), state.num_input_tokens_seen, state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = max(time.time() - self.start, 1e-9)
        postfix = {"tok/s": f"{(state.num_input_tokens_seen - self.start_tokens) / elapsed:.0f}"}
        if self.loss is not None:
            postfix = {"loss": f"{self.loss:.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger(TrainerCallback):
    """Every log event goes to metrics.jsonl as one JSON line, and to the readable log as text."""

    def __init__(self, path: Path, logger: logging.Logger = log, append: bool = False):
        """`append`: a resumed run keeps the history and marks where it resumed."""
        self.path = Path(path)
        self.log = logger
        if processes().is_main:  # the other processes never write it
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append or not self.path.exists():
                self.path.write_text("")
        self.last_time = None
        self.last_tokens = 0

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen
        if state.global_step and state.is_world_process_zero:
            self._write({"event": "resume", "step": state.global_step})
            self.log.info("resumed at step %d of %d", state.global_step, state.max_steps)

    def event(self, record: dict[str, Any]) -> None:
        """A record that is not a log step (e.g. a loss spike): one line in metrics.jsonl, a warning in the log."""
        if processes().is_main:
            self._write(record)
            self.log.warning("%s", json.dumps(record))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs and self.last_time is not None:
            tokens = state.num_input_tokens_seen - self.last_tokens
            record["tokens_per_second"] = round(tokens / max(now - self.last_time, 1e-9), 1)
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        self._write(record)
        shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if k != "step"}
        self.log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(shown))


class NonFiniteGradientGuard(TrainerCallback):
    """Stops before the optimizer step when a micro-batch's loss or a gradient is NaN or inf (after the step's
    last micro-batch). With several processes they decide together: a non-finite value on any one stops
    every process at the same step, each naming the value and the rows of the whole step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        loss = self.trainer.nonfinite_loss
        bad = [n for n, p in (model or self.trainer.model).named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        if not max_over_processes(int(loss is not None or bool(bad))):
            return
        reports = gather_from_processes((loss, bad[0] if bad else None, len(bad)))
        several = processes().world_size > 1
        on = [f" on rank {rank}" if several else "" for rank in range(len(reports))]
        # A non-finite loss is the cause (its gradients follow, on every process once they are summed).
        found = [f"the loss is {lo}{on[r]}" for r, (lo, _, _) in enumerate(reports) if lo is not None] or \
                [f"the gradient of {name} (and {n - 1} other tensor(s)) is not finite{on[r]}"
                 for r, (_, name, n) in enumerate(reports) if name]
        raise TrainingDiverged(f"step {state.global_step + 1}: {'; '.join(found)}; " + self.trainer.named_examples())

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.begin_step()  # also after a rollback, which left a step unfinished

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.begin_step()


class CheckpointState(TrainerCallback):
    """A callback whose state travels in checkpoints: written into each one before it is published
    (`save_state`, main process), read back when training continues from one (`load_state`)."""

    def saving(self):
        """A context the Trainer's own checkpoint save runs in."""
        return nullcontext()

    def save_state(self, folder: Path) -> None:
        pass

    def load_state(self, folder: Path) -> None:
        pass


class AdaLoraRankAllocator(CheckpointState):
    """AdaLoRA's update_and_allocate needs the gradients (importance = |w * grad|) and must run after
    the optimizer step and before zero_grad: Trainer's on_optimizer_step is exactly that point.

    For resume, a checkpoint keeps every rank and the allocator's importance scores: PEFT saves an
    AdaLoRA adapter cut to its current rank pattern, from which training could not continue (the pruned
    ranks can come back while the budget is still being allocated)."""

    KINDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model):
        self.adalora = adalora_model(model)
        self.config = self.adalora.peft_config[self.adalora.trainable_adapter_name]

    def on_optimizer_step(self, args, state, control, **kwargs):
        if any(p.grad is not None for p in self.adalora.parameters()):  # none: the step was skipped (spike guard)
            self.adalora.update_and_allocate(state.global_step)

    @contextmanager
    def saving(self) -> Iterator[None]:
        pattern, self.config.rank_pattern = self.config.rank_pattern, None  # no pattern: every rank is saved
        try:
            yield
        finally:
            self.config.rank_pattern = pattern

    def save_state(self, folder: Path) -> None:
        allocator = self.adalora.rankallocator
        tensors = {f"{kind}/{name}": t.detach().cpu().contiguous() for kind in self.KINDS
                   for name, t in getattr(allocator, kind).items()}
        save_file(tensors, str(folder / ADALORA_STATE), metadata={"rank_pattern": json.dumps(self.config.rank_pattern)})

    def load_state(self, folder: Path) -> None:
        path = folder / ADALORA_STATE
        if not path.is_file():
            raise MethodError(f"{folder}: no {ADALORA_STATE} (AdaLoRA's rank allocation state); this checkpoint was "
                              "not written by llm-finetune and AdaLoRA cannot continue from it exactly")
        allocator = self.adalora.rankallocator
        device = next(self.adalora.parameters()).device
        with safe_open(str(path), "pt") as f:
            self.config.rank_pattern = json.loads(f.metadata()["rank_pattern"])
            for kind in self.KINDS:
                getattr(allocator, kind).clear()
            for key in f.keys():
                kind, name = key.split("/", 1)
                getattr(allocator, kind)[name] = f.get_tensor(key).to(device)


def training_callbacks(cfg: RunConfig, model, logs_dir: Path, resuming: bool = False) -> list[TrainerCallback]:
    """metrics.jsonl (appended to when resuming), TensorBoard under logs_dir/tensorboard, early stopping,
    AdaLoRA's rank allocation."""
    callbacks: list[TrainerCallback] = [MetricsLogger(Path(logs_dir) / "metrics.jsonl", append=resuming)]
    if cfg.output.tensorboard:
        from transformers.integrations import TensorBoardCallback  # imports tensorboard: only when asked

        tb = TensorBoardCallback()
        tb.logging_dir = str(Path(logs_dir) / "tensorboard")  # otherwise it writes under output_dir/runs
        callbacks.append(tb)
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold))
    if adalora_model(model) is not None:
        callbacks.append(AdaLoraRankAllocator(model))
    return callbacks

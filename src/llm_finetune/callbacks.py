"""Trainer callbacks: a progress bar with loss, tokens/s and ETA, and per-step metrics as JSON lines."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressBar(TrainerCallback):
    """step/total, ETA (tqdm), the last logged loss and the training throughput in tokens/s."""

    def __init__(self):
        self.bar = None
        self.loss = None

    def on_train_begin(self, args, state, control, **kwargs):
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

    def __init__(self, path: Path, log: logging.Logger):
        self.path = Path(path)
        self.log = log
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.last_time = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs and self.last_time is not None:
            tokens = state.num_input_tokens_seen - self.last_tokens
            record["tokens_per_second"] = round(tokens / max(now - self.last_time, 1e-9), 1)
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if k != "step"}
        self.log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(shown))

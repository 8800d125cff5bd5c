"""The training loop's parts: how many steps, the TrainingArguments, the one Trainer subclass, callbacks.

`build_trainer` is what the recipe (train.py) calls; everything here is the stock transformers
`Trainer` plus what it lacks for this tool:
- the in-training eval loss is token-weighted, the same quantity the final report shows (the stock
  one is a mean of per-batch means, so a batch of short answers counts as much as one of long ones);
- AdaLoRA's orthogonality regulariser weighs the same whatever the gradient accumulation;
- a progress bar with loss and tokens/s, every log event as a JSON line in metrics.jsonl,
  TensorBoard, early stopping, AdaLoRA's rank allocation, and the best checkpoint named on disk.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from .attention import use_padding_free_attention
from .config import RunConfig
from .data.collate import EXAMPLE_KEY, PaddingCollator, PaddingFreeCollator
from .data.prepare import PreparedData
from .data.tokenize import IGNORE_INDEX
from .errors import MethodError, TrainingDiverged
from .evaluation.score import eval_loss
from .manifest import write_json
from .methods import METHODS, OPTIMIZERS
from .models import run_precision

log = logging.getLogger("llm_finetune")

BEST_MARKER = "best_checkpoint.json"


# ---------------------------------------------------------------------------------------------
# Steps and arguments


def plan_steps(cfg: RunConfig, data: PreparedData) -> int:
    """Optimizer steps for the run: max_steps, else the token budget, else epochs."""
    t = cfg.train
    per_step = t.batch_size * t.gradient_accumulation_steps
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        mean_len = data.train_stats.tokens / len(data.train)
        return max(1, math.ceil(t.max_tokens / (mean_len * per_step)))
    return max(1, math.ceil(len(data.train) * t.epochs / per_step))


def warmup_step_count(ratio: float, steps: int) -> int:
    """train.warmup_ratio as whole steps. Passed to TrainingArguments as an int, because transformers
    reads a warmup value >= 1 as a step count: a ratio of 1.0 would otherwise mean one step. Rounded
    before the ceiling so 0.07 x 100 (7.000000000000001 in floating point) is 7 steps, not 8."""
    return math.ceil(round(ratio * steps, 6))


def trainer_options(cfg: RunConfig, steps: int, learning_rate: float, has_eval: bool = False) -> dict[str, Any]:
    """The TrainingArguments keywords for this run (a dict, so they can be checked without a device).

    `has_eval`: a held-out set is at hand, so train.eval_steps evaluates (and keeps the best checkpoint)."""
    t = cfg.train
    cuda = torch.cuda.is_available()
    autocast = run_precision(cfg).autocast
    args = dict(
        output_dir=cfg.output.dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=learning_rate,
        max_steps=steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=warmup_step_count(t.warmup_ratio, steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        activation_checkpointing=t.gradient_checkpointing,
        optim=OPTIMIZERS[t.optimizer].trainer_name,
        use_cpu=not cuda,
        bf16=autocast == torch.bfloat16,
        fp16=autocast == torch.float16,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        # Examples of similar length share a batch (LengthGroupedSampler, seeded): less padding computed.
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        disable_tqdm=False,
    )
    if t.eval_steps and has_eval:
        args.update(eval_strategy="steps", eval_steps=t.eval_steps, per_device_eval_batch_size=cfg.eval.batch_size)
        if t.load_best_at_end:
            args.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
            if not t.save_steps:
                args["save_strategy"] = "best"  # a checkpoint only when the eval loss improves
    return args


def training_arguments(cfg: RunConfig, steps: int, learning_rate: float, has_eval: bool = False):
    return TrainingArguments(**trainer_options(cfg, steps, learning_rate, has_eval))


# ---------------------------------------------------------------------------------------------
# The Trainer subclass


class FinetuneTrainer(Trainer):
    """`Trainer` with a token-weighted eval loss, an AdaLoRA regulariser that ignores accumulation, the head
    only where tokens are trained, a stop on a non-finite loss, and padding-free batches counted right."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.example_sources: list[str] = []  # set by build_trainer: file:line of each training example
        self.step_examples: list[int] = []  # the examples of the optimizer step in progress

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The token-weighted loss the final report shows (same function, padded rows: per-example sums)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dataset]
        result = eval_loss(self.model, features, self.processing_class.pad_token_id,
                           self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_loss": result["loss"],
                   f"{metric_key_prefix}_perplexity": result["perplexity"],
                   f"{metric_key_prefix}_tokens": result["tokens"]}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _track_num_input_tokens(self, inputs):
        """A padding-free batch has no padding (and no attention mask): every token counts. Stock
        counting would compare with the pad id, which a packed row holds as real text when the pad token
        is also the end-of-turn token."""
        if "cu_seq_lens_q" not in inputs or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        tokens = torch.as_tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step, stopped before the optimizer step when the loss is not finite (the stock Trainer
        only hides it in its logs), naming the step and the batch's examples."""
        examples = inputs.pop(EXAMPLE_KEY, None)
        if examples is not None:
            self.step_examples += examples.tolist()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(f"step {self.state.global_step + 1}: the loss is {float(loss)}; "
                                   + self.named_examples())
        return loss

    def named_examples(self) -> str:
        names = [self.example_sources[i] if i < len(self.example_sources) else f"#{i}" for i in self.step_examples]
        return (f"the batch held {', '.join(names[:16])}{' ...' if len(names) > 16 else ''}. Training stopped "
                "before the optimizer step; checkpoints already written are kept. Check these rows, or lower "
                "train.learning_rate / set train.max_grad_norm")

    # Set by build_trainer: the output head runs only where a token is trained (methods that do not
    # change the sequence or add their own loss term: the LoRA family, IA3, full).
    logits_where_trained = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Under autocast (a half-precision base), PEFT's own cast of each adapted layer's input to the
        adapter's fp32 is turned off while training: autocast computes the adapter in the half dtype
        from the input as it is, so no fp32 copy of it is kept for the backward pass. Outside training
        (evaluation has no autocast) PEFT casts as usual."""
        autocast = model.training and (self.args.bf16 or self.args.fp16)
        with _adapter_inputs_uncast(model, autocast):
            if self.logits_where_trained and model.training and not return_outputs and self.compute_loss_func is None:
                return self._loss_where_trained(model, inputs, num_items_in_batch)
            return self._model_loss(model, inputs, return_outputs, num_items_in_batch)

    def _loss_where_trained(self, model, inputs, num_items_in_batch):
        """The causal-LM loss with the output head applied only at positions whose next token is trained.

        The head is about a fifth of a small model's compute, and its (tokens x vocabulary) logits are the
        largest activation; prompt tokens need neither. Same value as the model's own loss (sum of
        cross-entropy over trained tokens / num_items_in_batch, or their mean), hence the same gradients."""
        labels = inputs["labels"]
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions trained in any row
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
        logits = outputs.logits.float()
        targets = targets[:, keep]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        if num_items_in_batch is None:
            return loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales a model's own loss
        return loss

    def _model_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """AdaLoRA: PEFT adds `orth_reg_weight * R` to the loss of every forward pass (AdaLoraModel.forward).
        The Trainer passes `num_items_in_batch` (the accumulated batch's supervised tokens) to the model,
        so each micro-batch's cross-entropy is already a share of the accumulated batch's mean and the
        Trainer does not divide by the accumulation steps: the regulariser would count once per
        micro-batch, k times with accumulation k. Each micro-batch here carries 1/k of it instead, so
        (batch 8, accumulation 1) and (batch 2, accumulation 4) give the same loss and gradients."""
        adalora = _adalora_model(self.accelerator.unwrap_model(model))
        loss_is_a_share = (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else
                           (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                           or self.compute_loss_func is not None)  # as Trainer.training_step decides
        micro_batches = getattr(self, "current_gradient_accumulation_steps", 1)
        if adalora is None or not (model.training and loss_is_a_share and micro_batches > 1):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        config = adalora.peft_config[adalora.trainable_adapter_name]
        weight = config.orth_reg_weight
        config.orth_reg_weight = weight / micro_batches
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            config.orth_reg_weight = weight


@contextmanager
def _adapter_inputs_uncast(model, active: bool) -> Iterator[None]:
    """PEFT's `disable_input_dtype_casting`, for every adapter layer type (PEFT's own fails on IA3, whose
    layers lack the flag)."""
    if not active:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m.cast_input_dtype_enabled = flag


def _adalora_model(model):
    """The AdaLoraModel inside a PEFT model (it adds the regulariser and allocates ranks), else None."""
    base = getattr(model, "base_model", None)
    return base if type(base).__name__ == "AdaLoraModel" else None


# ---------------------------------------------------------------------------------------------
# Callbacks


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

    def __init__(self, path: Path, logger: logging.Logger = log, append: bool = False):
        """`append`: a resumed run keeps the history and marks where it resumed."""
        self.path = Path(path)
        self.log = logger
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append or not self.path.exists():
            self.path.write_text("")
        self.last_time = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen
        if state.global_step and state.is_world_process_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"event": "resume", "step": state.global_step}) + "\n")
            self.log.info("resumed at step %d of %d", state.global_step, state.max_steps)

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


class NonFiniteGradientGuard(TrainerCallback):
    """Stops before the optimizer step when a gradient is NaN or inf (after the step's last micro-batch)."""

    def __init__(self, trainer: FinetuneTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = [n for n, p in (model or self.trainer.model).named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise TrainingDiverged(f"step {state.global_step + 1}: the gradient of {bad[0]} (and {len(bad) - 1} "
                                   f"other tensor(s)) is not finite; " + self.trainer.named_examples())

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.step_examples = []


class AdaLoraRankAllocator(TrainerCallback):
    """AdaLoRA's update_and_allocate needs the gradients (importance = |w * grad|) and must run after
    the optimizer step and before zero_grad: Trainer's on_optimizer_step is exactly that point."""

    def __init__(self, model):
        self.adalora = _adalora_model(model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.adalora.update_and_allocate(state.global_step)


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
    if _adalora_model(model) is not None:
        callbacks.append(AdaLoraRankAllocator(model))
    return callbacks


# ---------------------------------------------------------------------------------------------
# Putting it together


def _dataset(rows) -> Dataset:
    return Dataset.from_dict({"input_ids": [e.input_ids for e in rows], "labels": [e.labels for e in rows],
                              "length": [len(e.input_ids) for e in rows], "example": list(range(len(rows)))})


def build_trainer(cfg: RunConfig, model, tokenizer, data: PreparedData, steps: int, learning_rate: float,
                  logs_dir: Path, resuming: bool = False, extra_callbacks: list | None = None) -> FinetuneTrainer:
    """The Trainer for this run: padding-free packed rows (train.packing: the collator, and the model's
    attention switched to attention.varlen_sdpa) or padded rows, and the in-training eval set (the
    selection set when there is one, else the eval set) when train.eval_steps asks for it."""
    if cfg.packing and (why_not := use_padding_free_attention(model)):
        raise MethodError(f"train.packing: {why_not}; set train.packing=false")
    in_training_eval = data.selection or data.eval
    eval_dataset = _dataset(in_training_eval) if cfg.train.eval_steps and in_training_eval else None
    trainer = FinetuneTrainer(
        model=model,
        args=training_arguments(cfg, steps, learning_rate, has_eval=eval_dataset is not None),
        train_dataset=_dataset(data.train),
        eval_dataset=eval_dataset,
        data_collator=PaddingFreeCollator() if cfg.packing else PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=training_callbacks(cfg, model, logs_dir, resuming) + list(extra_callbacks or []),
    )
    trainer.logits_where_trained = METHODS[cfg.method.name].family in ("lora", "ia3", "full")
    trainer.example_sources = [e.source for e in data.train]
    trainer.add_callback(NonFiniteGradientGuard(trainer))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())
    return trainer


def mark_best_checkpoint(trainer: Trainer, out_dir: Path) -> dict[str, Any] | None:
    """Name the best checkpoint in out_dir/best_checkpoint.json (and return it for the manifest)."""
    state = trainer.state
    if not state.best_model_checkpoint:
        return None
    evals = [r for r in state.log_history if "eval_loss" in r]
    info = {"checkpoint": Path(state.best_model_checkpoint).name, "path": str(state.best_model_checkpoint),
            "step": state.best_global_step, "eval_loss": state.best_metric, "metric": "eval_loss (token-weighted)",
            "evaluations": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in evals],
            "stopped_early": state.global_step < state.max_steps,
            "final_adapter_is_best": bool(trainer.args.load_best_model_at_end)}
    write_json(Path(out_dir) / BEST_MARKER, info)
    return info

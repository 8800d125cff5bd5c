"""The training loop's parts: how many steps, the TrainingArguments, the one Trainer subclass.

`build_trainer` is what the recipe (train.py) calls; everything here is the stock transformers
`Trainer` plus what it lacks for this tool:
- the loss is computed only where a token is trained, the output head in chunks (head_loss.py);
- the in-training eval loss is token-weighted, the same quantity the final report shows (the stock
  one is a mean of per-batch means, so a batch of short answers counts as much as one of long ones);
- AdaLoRA's orthogonality regulariser weighs the same whatever the gradient accumulation;
- a non-finite loss stops the run before the optimizer step, naming the batch's rows;
- a checkpoint appears under its name only once complete (written aside, renamed into place), with the
  state of the callbacks that keep some (callbacks.CheckpointState);
- the callbacks (callbacks.py): progress, metrics.jsonl, TensorBoard, early stopping, AdaLoRA's rank
  allocation; and the best checkpoint named on disk.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import ProgressCallback, Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .artifacts import CHECKPOINT_STAGING
from .attention import use_padding_free_attention
from .callbacks import CheckpointState, NonFiniteGradientGuard, ProgressBar, adalora_model, training_callbacks
from .config import RunConfig
from .data.collate import EXAMPLE_KEY, GlobalLengthGroupedSampler, NamingExamples, PaddingCollator, PaddingFreeCollator
from .data.prepare import PreparedData
from .data.tokenize import IGNORE_INDEX
from .distributed import gather_from_processes, processes
from .errors import MethodError
from .evaluation.score import eval_loss
from .head_loss import trained_tokens_loss
from .manifest import publish_dir, write_json
from .methods import METHODS, OPTIMIZERS
from .models import run_precision

log = logging.getLogger("llm_finetune")

BEST_MARKER = "best_checkpoint.json"


# ---------------------------------------------------------------------------------------------
# Steps and arguments


def global_batch(cfg: RunConfig, world_size: int | None = None) -> int:
    """Examples per optimizer step: train.batch_size x accumulation on each of the run's processes (or of
    `world_size` processes, for a plan)."""
    return cfg.train.batch_size * cfg.train.gradient_accumulation_steps * (world_size or processes().world_size)


def plan_steps(cfg: RunConfig, data: PreparedData, world_size: int | None = None) -> int:
    """Optimizer steps for the run: max_steps, else the token budget, else epochs."""
    t = cfg.train
    per_step = global_batch(cfg, world_size)
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        mean_len = data.train_stats.tokens / len(data.train)
        return max(1, math.ceil(t.max_tokens / (mean_len * per_step)))
    return epoch_steps(cfg, len(data.train), world_size)


def epoch_steps(cfg: RunConfig, examples: int, world_size: int | None = None) -> int:
    """Optimizer steps for `examples` rows over train.epochs."""
    return max(1, math.ceil(examples * cfg.train.epochs / global_batch(cfg, world_size)))


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
        # Several processes (DDP): every trainable weight takes part in each forward pass, so DDP need not
        # search the graph for unused ones each step.
        ddp_find_unused_parameters=False,
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
        self.step_losses: list[torch.Tensor] = []  # its micro-batches' losses (their sum is the step's loss)
        self.nonfinite_loss: float | None = None  # the first non-finite micro-batch loss of that step
        self._staging_run_dir: str | None = None

    def _checkpoint_states(self) -> list[CheckpointState]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointState)]

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for state in self._checkpoint_states():
            state.load_state(Path(resume_from_checkpoint))

    def _get_output_dir(self, trial) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock save, written into a hidden staging folder and renamed into place once complete:
        checkpoint-N either does not exist or is whole (a kill or a full disk mid-write leaves at most the
        staging folder, `.checkpoint-N.partial`, which no resume reads). Then what the stock save does
        against the run folder: point at the best checkpoint, rotate the oldest out (never the best)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".{name}{CHECKPOINT_STAGING}"
        final = run_dir / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        try:
            with ExitStack() as stack:
                for state in self._checkpoint_states():
                    stack.enter_context(state.saving())
                super()._save_checkpoint(model, trial)
            if self.args.should_save:
                if self.state.best_model_checkpoint == str(staging / name):  # the step being saved is the best
                    self.state.best_model_checkpoint = str(final)
                    self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
                for state in self._checkpoint_states():
                    state.save_state(staging / name)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                publish_dir(staging / name, final)
        finally:
            self._staging_run_dir = None
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
        if self.state.best_global_step and best.is_dir():
            self.state.best_model_checkpoint = str(best)
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

    # Set by a recipe whose collator drops the example index (TRL's): the dataset column that holds it.
    example_column: str | None = None

    def get_train_dataloader(self):
        if self.example_column is None:
            return super().get_train_dataloader()
        collate = self.data_collator
        self.data_collator = NamingExamples(collate, self.example_column)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def _get_train_sampler(self, train_dataset=None):
        """train.group_by_length: grouped by the global batch, so any split of it trains the same examples."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return GlobalLengthGroupedSampler(batch, dataset["length"], self.args.data_seed)

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
        is also the end-of-turn token. A batch of preference pairs held apart (TRL's ORPO / CPO batches: no
        `input_ids`, for which the stock count logs 0): the non-padding tokens of both sides."""
        if self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        if "cu_seq_lens_q" in inputs:
            tokens = inputs["input_ids"].numel()
        elif "input_ids" not in inputs and "chosen_attention_mask" in inputs:
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        else:
            return super()._track_num_input_tokens(inputs)
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step; a non-finite loss is noted (the stock Trainer only hides it in its logs) and
        stops the run before the optimizer step (callbacks.NonFiniteGradientGuard, on every process)."""
        examples = inputs.pop(EXAMPLE_KEY, None)
        if examples is not None:
            self.step_examples += examples.tolist()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all() and self.nonfinite_loss is None:
            self.nonfinite_loss = float(loss)
        self.step_losses.append(loss.detach())
        return loss

    def begin_step(self) -> None:
        self.step_examples, self.step_losses, self.nonfinite_loss = [], [], None

    def step_loss(self) -> float:
        """The loss of the optimizer step in progress, as logged: its micro-batches' sum, averaged over processes."""
        total = torch.stack(self.step_losses).sum() if self.step_losses else torch.zeros((), device=self.args.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="mean")
        return float(total)

    def step_sources(self) -> list[str]:
        """file:line of each example in the optimizer step in progress, on every process (all call it together)."""
        mine = [self.example_sources[i] if i < len(self.example_sources) else f"#{i}" for i in self.step_examples]
        return [name for names in gather_from_processes(mine) for name in names]

    def named_examples(self) -> str:
        names = self.step_sources()
        held = f"the batch held {', '.join(names[:16])}{' ...' if len(names) > 16 else ''}. " if names else ""
        return (f"{held}Training stopped before the optimizer step; checkpoints already written are kept. Check "
                f"{'these rows' if names else 'the data'}, or lower train.learning_rate / set train.max_grad_norm")

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
        """The causal-LM loss with the output head applied only at positions whose next token is trained, in
        chunks (head_loss.py). Same value as the model's own loss (sum of cross-entropy over trained tokens /
        num_items_in_batch, or their mean), hence the same gradients."""
        if num_items_in_batch is None:
            scale = 1 / (inputs["labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        else:
            scale = 1 / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                scale = scale * self.accelerator.num_processes  # as Trainer.compute_loss scales the model's loss
        return trained_tokens_loss(model, self.accelerator.unwrap_model(model), inputs, scale)

    def _model_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """AdaLoRA: PEFT adds `orth_reg_weight * R` to the loss of every forward pass (AdaLoraModel.forward).
        The Trainer passes `num_items_in_batch` (the accumulated batch's supervised tokens) to the model,
        so each micro-batch's cross-entropy is already a share of the accumulated batch's mean and the
        Trainer does not divide by the accumulation steps: the regulariser would count once per
        micro-batch, k times with accumulation k. Each micro-batch here carries 1/k of it instead, so
        (batch 8, accumulation 1) and (batch 2, accumulation 4) give the same loss and gradients."""
        adalora = adalora_model(self.accelerator.unwrap_model(model))
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

"""Evaluation during training: eval loss every N steps, TensorBoard, early stopping, best checkpoint.

The Trainer's own eval loss is a mean of per-batch means weighted by examples, so a batch of short
answers counts as much as one of long answers; the final report's loss is a mean over supervised
tokens. `token_weighted_eval` makes the in-training number the same quantity (same function, same
collator), so the curve, early stopping and the best checkpoint all use the loss the report shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .manifest import write_json

BEST_MARKER = "best_checkpoint.json"


def check_settings(cfg: RunConfig, has_eval: bool) -> None:
    """Raise ConfigError for combinations that cannot work, before anything is written."""
    t = cfg.train
    if t.eval_steps and not has_eval:
        raise ConfigError("train.eval_steps needs a held-out set: set data.eval_file (or train.eval_steps=null)")
    if t.early_stopping_patience and not t.eval_steps:
        raise ConfigError("train.early_stopping_patience needs train.eval_steps (how often to measure eval loss), "
                          "e.g. --set train.eval_steps=25")
    if t.early_stopping_patience and not t.load_best_at_end:
        raise ConfigError("train.early_stopping_patience needs train.load_best_at_end=true (the Trainer tracks "
                          "the best eval loss through it)")
    if t.eval_steps and t.load_best_at_end and t.save_steps and t.save_steps % t.eval_steps:
        raise ConfigError(f"train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps "
                          f"({t.eval_steps}) to keep the best checkpoint; or set train.save_steps=null to save "
                          "only when the eval loss improves")


def training_arguments_overrides(cfg: RunConfig, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments for evaluation every N steps and for keeping the best checkpoint."""
    t = cfg.train
    if not (t.eval_steps and has_eval):
        return {}
    extra: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": t.eval_steps,
                             "per_device_eval_batch_size": cfg.eval.batch_size}
    if t.load_best_at_end:
        extra.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
        if not t.save_steps:
            extra["save_strategy"] = "best"  # a checkpoint only when the eval loss improves
    return extra


def token_weighted_eval(trainer_cls):
    """A subclass of `trainer_cls` whose evaluate() reports the token-weighted loss (see module doc).

    A factory rather than a fixed subclass so it works on whichever Trainer class the method uses."""
    from .evaluate import eval_loss

    class TokenWeightedEvalTrainer(trainer_cls):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dataset]
            pad = getattr(self.data_collator, "pad_token_id", None)
            if pad is None:
                pad = self.processing_class.pad_token_id
            result = eval_loss(self.model, features, pad, self.args.per_device_eval_batch_size, self.data_collator)
            metrics = {f"{metric_key_prefix}_loss": result["loss"],
                       f"{metric_key_prefix}_perplexity": result["perplexity"],
                       f"{metric_key_prefix}_tokens": result["tokens"]}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return TokenWeightedEvalTrainer


def training_callbacks(cfg: RunConfig, logs_dir: Path) -> list:
    """TensorBoard event files under logs_dir/tensorboard, and early stopping when asked."""
    callbacks: list = []
    if cfg.output.tensorboard:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = str(Path(logs_dir) / "tensorboard")  # otherwise it writes under output_dir/runs
        callbacks.append(tb)
    if cfg.train.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold))
    return callbacks


def mark_best_checkpoint(trainer, out_dir: Path) -> dict[str, Any] | None:
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

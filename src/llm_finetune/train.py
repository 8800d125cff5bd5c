"""The training entry: setup -> train -> save -> evaluate. Read it top to bottom.

    llm-finetune train --config config/lora_config.json [--set train.learning_rate=1e-4]

Everything that can be checked without weights (config, data, template) is checked before the
model is loaded or any output folder is created, so bad input never leaves half-written outputs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data.records import Example
from .data.tokenize import ChatEncoder, EncodeStats, Encoded
from .leakage import TrainIndex
from .manifest import atomic_dir, package_versions, write_json, write_jsonl
from .models import Precision

log = logging.getLogger("llm_finetune")


@dataclass
class PreparedData:
    encoder: ChatEncoder
    train: list[Encoded]
    train_stats: EncodeStats
    # The rows the report scores (those with a prompt), each with its own encoding: one list of pairs,
    # so a per-example value can never be read off another example.
    eval_pairs: list[tuple[Example, Encoded]] = field(default_factory=list)
    eval: list[Encoded] = field(default_factory=list)  # every held-out row, text too: the in-training eval loss
    # data.selection_fraction: rows held out of training for train.eval_steps (best checkpoint, early
    # stopping) in place of `eval`, so the reported set takes no part in choosing the adapter.
    selection: list[Encoded] = field(default_factory=list)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # splits, dedup, template, cache: for the manifest
    rejects: list[dict[str, Any]] = field(default_factory=list)  # invalid or dropped rows, with reasons
    added_tokens: list[int] = field(default_factory=list)  # special tokens the template added
    trained_index: TrainIndex | None = None  # keys of the examples actually trained: the leak check's reference

    @property
    def eval_examples(self) -> list[Example]:
        return [ex for ex, _ in self.eval_pairs]


@dataclass
class RunResult:
    adapter_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any] | None


# ---------------------------------------------------------------------------------------------
# Setup


def setup_logging(logs_dir: Path) -> Path:
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / "training.log"
    for h in list(log.handlers):
        if getattr(h, "_llm_finetune", False):
            log.removeHandler(h)
            h.close()
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._llm_finetune = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    from .quiet import relay_into

    relay_into(handler)  # library notices held since the CLI started (see quiet.py) land here, not on screen
    return path


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    """Read, validate and encode the data; raises DataError naming the line on any bad row.

    Nothing is written here (the cache aside), so a bad row stops the run before any output exists.
    """
    from .data.splits import build_splits

    return build_splits(cfg, tokenizer)


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


def run_precision(cfg: RunConfig) -> Precision:
    """Load and autocast dtypes for this run (models.training_precision): fp32 wherever weights train in full."""
    from .models import training_precision

    return training_precision(cfg.model.dtype, cfg.method.name == "full" or bool(cfg.method.modules_to_save))


def warmup_step_count(ratio: float, steps: int) -> int:
    """train.warmup_ratio as whole steps. Passed to TrainingArguments as an int, because transformers
    reads a warmup value >= 1 as a step count: a ratio of 1.0 would otherwise mean one step. Rounded
    before the ceiling so 0.07 x 100 (7.000000000000001 in floating point) is 7 steps, not 8."""
    return math.ceil(round(ratio * steps, 6))


def training_arguments(cfg: RunConfig, steps: int, learning_rate: float, extra: dict[str, Any] | None = None):
    from transformers import TrainingArguments

    return TrainingArguments(**trainer_options(cfg, steps, learning_rate, extra))


def trainer_options(cfg: RunConfig, steps: int, learning_rate: float,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TrainingArguments keywords for this run (separate, so they can be checked without a device)."""
    import torch

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
        optim=_optimizer_name(t.optimizer),
        use_cpu=not cuda,
        bf16=autocast == torch.bfloat16,
        fp16=autocast == torch.float16,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )
    args.update(extra or {})  # e.g. evaluation every N steps (train_eval.training_arguments_overrides)
    return args


def _optimizer_name(name: str) -> str:
    from .methods import OPTIMIZERS

    return OPTIMIZERS[name]


# ---------------------------------------------------------------------------------------------
# The run


def run(cfg: RunConfig) -> RunResult:
    import torch

    from . import methods
    from .callbacks import MetricsLogger, ProgressBar
    from .data.collate import PaddingCollator
    from .models import load_model, load_tokenizer, resolve_source

    started = time.time()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    out_dir, logs_dir = Path(cfg.output.dir), Path(cfg.output.logs_dir)

    # Setup: model source, tokenizer and data are all checked before anything is written.
    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    data = prepare_data(cfg, tokenizer)
    steps = plan_steps(cfg, data)
    learning_rate = cfg.train.learning_rate or methods.default_learning_rate(cfg.method.name)
    # What this machine cannot run is refused here, before any weights are loaded or anything written.
    method_notes = methods.preflight(cfg)
    quantization = methods.effective_quantization(cfg.method.name, cfg.model.quantization)
    cfg.train.learning_rate = learning_rate  # the saved config is the resolved one

    # Evaluation settings and the regression set are checked here too, before anything is written.
    from . import train_eval
    from .evaluate import load_eval_set, options_from_config

    train_eval.check_settings(cfg, bool(data.eval or data.selection))
    eval_options = options_from_config(cfg.eval)
    regression = (load_eval_set(cfg.eval.regression_file, data.encoder, cfg.data.format,
                                on_error=cfg.data.on_error, roles=cfg.data.roles)
                  if cfg.eval.regression_file and data.eval_pairs else None)

    log_path = setup_logging(logs_dir)
    log.info("llm-finetune run: method=%s model=%s (%s)", cfg.method.name, source.hub_id or source.load_path,
             source.kind)
    for note in source.notes:
        log.info("model source: %s", note)
    for note in method_notes:
        log.info("method: %s", note)
    for problem in data.info.get("file_problems", []):  # first: the file itself is damaged (on_error: skip)
        log.warning("data: FILE PROBLEM %s; the rows before it were used", problem)
    log.info("data: %d training examples kept of %d (%d truncated, %d skipped), %d tokens, %d trained tokens",
             data.train_stats.kept, data.train_stats.examples, data.train_stats.truncated,
             len(data.train_stats.skipped or []), data.train_stats.tokens, data.train_stats.trained_tokens)
    if data.selection:
        log.info("selection: %d rows held out of training (data.selection_fraction) for train.eval_steps: the best "
                 "checkpoint and early stopping use them, not the eval set the report scores", len(data.selection))
    for s in (data.train_stats.skipped or [])[:20]:
        log.warning("skipped %s: %s", s.source, s.reason)
    if data.rejects:
        rejected_path = logs_dir / "rejected_rows.jsonl"
        write_jsonl(rejected_path, data.rejects)
        log.warning("data: %d row(s) not used (invalid, too long, no trained token or duplicate); each with its "
                    "reason in %s",
                    len(data.rejects), rejected_path)
    for f in data.info.get("ignored_files", []):
        log.warning("data: ignored %s (not a supported data file type)", f)
    if data.added_tokens:
        log.info("template %s: added special tokens %s (ids %s) to the tokenizer; their embedding rows are "
                 "trained and saved with the adapter", cfg.data.template, data.info["added_tokens"], data.added_tokens)
    log.info("plan: %d steps of %d examples, learning rate %g", steps,
             cfg.train.batch_size * cfg.train.gradient_accumulation_steps, learning_rate)

    from transformers import set_seed

    set_seed(cfg.train.seed)  # adapter initialisation is part of the run's reproducible state
    model = load_model(source, run_precision(cfg).load_name, quantization, cfg.model.trust_remote_code,
                       cfg.model.revision, tokenizer=tokenizer)  # fp32 where weights train in full (run_precision)
    model = methods.apply_method(model, cfg.method, total_steps=steps, tokenizer=tokenizer,
                                 tokenizer_path=source.load_path,
                                 gradient_checkpointing=cfg.train.gradient_checkpointing,
                                 trainable_token_indices=data.added_tokens or None)
    trainable, total = methods.count_parameters(model)
    log.info("parameters: %d trainable of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    # Train.
    from datasets import Dataset
    from transformers import ProgressCallback, Trainer

    train_dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in data.train],
                                       "labels": [e.labels for e in data.train]})
    eval_dataset = None
    in_training_eval = data.selection or data.eval  # the selection set when there is one
    if cfg.train.eval_steps and in_training_eval:
        eval_dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in in_training_eval],
                                          "labels": [e.labels for e in in_training_eval]})
    trainer = train_eval.token_weighted_eval(methods.trainer_class(cfg.method.name, Trainer))(
        model=model,
        args=training_arguments(cfg, steps, learning_rate,
                                train_eval.training_arguments_overrides(cfg, eval_dataset is not None)),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsLogger(logs_dir / "metrics.jsonl", log), *train_eval.training_callbacks(cfg, logs_dir),
                   *methods.training_callbacks(model, cfg.method.name)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())
    train_output = trainer.train()
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    log.info("training done: %d steps, final loss %.4f, %d tokens seen, %.0f s",
             trainer.state.global_step, train_output.training_loss, tokens_seen, train_output.metrics["train_runtime"])
    best = train_eval.mark_best_checkpoint(trainer, out_dir)
    if best:
        log.info("best checkpoint: %s (step %s, eval loss %.4f)%s", best["checkpoint"], best["step"],
                 best["eval_loss"], "; it is the final adapter" if best["final_adapter_is_best"] else "")

    # Save first: the adapter folder describes itself and replaces the old one in one rename. Nothing
    # after training that can fail (evaluation, leak check, report) can cost the adapter.
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": cfg.method.name,
        "quantization": quantization,
        "merge": methods.MERGE_NOTES[cfg.method.name],
        "model": source.to_dict(),
        "data": {**data.fingerprints, "train": data.train_stats.to_dict(), "eval_examples": len(data.eval),
                 "shuffle_seed": cfg.data.shuffle_seed, "template_end_of_turn": data.encoder.end_of_turn,
                 **data.info},
        "training": {"steps": trainer.state.global_step, "learning_rate": learning_rate, "seed": cfg.train.seed,
                     "tokens_seen": tokens_seen, "final_loss": train_output.training_loss,
                     "trainable_parameters": trainable, "total_parameters": total,
                     "train_runtime_s": train_output.metrics["train_runtime"]},
        "wall_time_s": round(time.time() - started, 1),
        "versions": package_versions(),
        "evaluation": None,  # filled in below, once the saved adapter is evaluated
        "best_checkpoint": best,
    }
    adapter_dir = out_dir / cfg.output.adapter_name
    with atomic_dir(adapter_dir, overwrite=cfg.output.overwrite) as tmp:
        # Added tokens: only their trained rows are saved (PEFT's trainable tokens), not the whole
        # resized embedding matrix PEFT would otherwise copy; `generate` resizes the base first.
        model.save_pretrained(tmp, **({"save_embedding_layers": False} if data.added_tokens else {}))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "run_config.json", cfg.to_dict())
        write_json(tmp / "run_manifest.json", manifest)
        from .hub import describe_adapter_folder

        describe_adapter_folder(tmp)  # base named by its Hub id, our model card as README.md
    write_json(out_dir / "run_manifest.json", manifest)
    log.info("adapter written to %s", adapter_dir)

    # Evaluate base vs tuned on the held-out set, then add the results to the saved adapter folder.
    report = None
    if data.eval_pairs:
        try:
            report = _evaluate_run(cfg, model, data, source, best, eval_options, regression, logs_dir)
        except Exception:
            log.exception("evaluation failed; the trained adapter is saved in %s", adapter_dir)
            raise
        from .report import write_into_adapter

        write_into_adapter(adapter_dir, report)
        manifest["evaluation"] = {k: v for k, v in report.items() if k not in ("examples", "regression")}
    elif data.eval:
        log.warning("evaluation: the %d held-out rows are plain text (no prompt to answer): only the in-training "
                    "eval loss covers them; no report", len(data.eval))
    manifest["wall_time_s"] = round(time.time() - started, 1)
    write_json(adapter_dir / "run_manifest.json", manifest)
    write_json(out_dir / "run_manifest.json", manifest)
    if report:
        from .hub import write_adapter_card

        write_adapter_card(adapter_dir)  # the card again, now with the evaluation table and final manifest
    log.info("run done: adapter in %s; log in %s; wall time %.0f s", adapter_dir, log_path, manifest["wall_time_s"])
    return RunResult(adapter_dir, manifest, report)


def _evaluate_run(cfg: RunConfig, model, data: PreparedData, source, best: dict[str, Any] | None, eval_options,
                  regression, logs_dir: Path) -> dict[str, Any]:
    """Base vs tuned on the held-out rows (in eval mode), the leak check against the examples actually
    trained, and report.md / report.json / plots in output.dir."""
    from .evaluate import compare_base_and_tuned, format_table
    from .models import load_model
    from .report import add_context, write_report

    e = cfg.eval
    base_model = None
    if cfg.method.name == "full" and e.compare_base:
        # Full fine-tuning changed the weights in place: the base is a fresh copy from disk.
        # Loaded as the tuned model was (fp32 master weights where it trained in full), so both sides
        # of the table compute in the same precision.
        base_model = load_model(source, run_precision(cfg).load_name, "none", cfg.model.trust_remote_code,
                                cfg.model.revision, tokenizer=data.encoder.tokenizer)
    examples = [ex for ex, _ in data.eval_pairs]
    encoded = [enc for _, enc in data.eval_pairs]
    report = compare_base_and_tuned(model, data.encoder, examples, encoded, e.metric, e.max_new_tokens,
                                    e.batch_size, e.compare_base, eval_options, regression, base_model=base_model)
    del base_model
    # Without a selection set, the best checkpoint was chosen on data.eval: the set this report scores.
    add_context(report, cfg, examples, source, best, trained=data.trained_index,
                best_on_same_set=not data.selection)
    if e.report:
        paths = write_report(report, Path(cfg.output.dir), logs_dir / "metrics.jsonl")
        log.info("report written to %s", paths["md"])
    log.info("evaluation on %s (%d examples):\n%s", cfg.data.eval_file, len(examples), format_table(report))
    return report

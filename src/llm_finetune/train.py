"""The training entry: setup -> train -> save -> evaluate. Read it top to bottom.

    llm-finetune train --config config/lora_config.json [--set train.learning_rate=1e-4]

Everything that can be checked without weights (config, data, template) is checked before the
model is loaded or any output folder is created, so bad input never leaves half-written outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data.records import Example
from .data.tokenize import ChatEncoder, EncodeStats, Encoded
from .manifest import atomic_dir, package_versions, write_json

log = logging.getLogger("llm_finetune")


@dataclass
class PreparedData:
    encoder: ChatEncoder
    train: list[Encoded]
    train_stats: EncodeStats
    eval_examples: list[Example] = field(default_factory=list)
    eval: list[Encoded] = field(default_factory=list)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # splits, dedup, template, cache: for the manifest
    rejects: list[dict[str, Any]] = field(default_factory=list)  # invalid or dropped rows, with reasons
    added_tokens: list[int] = field(default_factory=list)  # special tokens the template added


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


def training_arguments(cfg: RunConfig, steps: int, learning_rate: float, extra: dict[str, Any] | None = None):
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    cuda = torch.cuda.is_available()
    from .models import pick_dtype

    bf16 = cuda and pick_dtype(cfg.model.dtype) == torch.bfloat16
    args = dict(
        output_dir=cfg.output.dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=learning_rate,
        max_steps=steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
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
        bf16=bf16,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )
    args.update(extra or {})  # e.g. evaluation every N steps (train_eval.training_arguments_overrides)
    return TrainingArguments(**args)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    train_eval.check_settings(cfg, bool(data.eval))
    eval_options = options_from_config(cfg.eval)
    regression = (load_eval_set(cfg.eval.regression_file, data.encoder, cfg.data.format)
                  if cfg.eval.regression_file and data.eval else None)

    log_path = setup_logging(logs_dir)
    log.info("llm-finetune run: method=%s model=%s (%s)", cfg.method.name, source.hub_id or source.load_path,
             source.kind)
    for note in source.notes:
        log.info("model source: %s", note)
    for note in method_notes:
        log.info("method: %s", note)
    log.info("data: %d training examples kept of %d (%d truncated, %d skipped), %d tokens, %d trained tokens",
             data.train_stats.kept, data.train_stats.examples, data.train_stats.truncated,
             len(data.train_stats.skipped or []), data.train_stats.tokens, data.train_stats.trained_tokens)
    for s in (data.train_stats.skipped or [])[:20]:
        log.warning("skipped %s: %s", s.source, s.reason)
    if data.rejects:
        rejected_path = logs_dir / "rejected_rows.jsonl"
        write_jsonl_atomic(rejected_path, data.rejects)
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
    model = load_model(source, cfg.model.dtype, quantization, cfg.model.trust_remote_code,
                       cfg.model.revision)
    if data.added_tokens:
        model.resize_token_embeddings(len(tokenizer))
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
    if cfg.train.eval_steps and data.eval:
        eval_dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in data.eval],
                                          "labels": [e.labels for e in data.eval]})
    trainer = train_eval.token_weighted_eval(Trainer)(
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

    # Evaluate base vs tuned on the held-out set.
    report = None
    if data.eval:
        from .evaluate import compare_base_and_tuned, format_table
        from .report import add_context, write_report

        e = cfg.eval
        base_model = None
        if cfg.method.name == "full" and e.compare_base:
            # Full fine-tuning changed the weights in place: the base is a fresh copy from disk.
            base_model = load_model(source, cfg.model.dtype, "none", cfg.model.trust_remote_code,
                                    cfg.model.revision)
        report = compare_base_and_tuned(model, data.encoder, data.eval_examples, data.eval, e.metric,
                                        e.max_new_tokens, e.batch_size, e.compare_base, eval_options, regression,
                                        base_model=base_model)
        del base_model
        add_context(report, cfg, data.eval_examples, source, best)
        if e.report:
            paths = write_report(report, out_dir, logs_dir / "metrics.jsonl")
            log.info("report written to %s", paths["md"])
        log.info("evaluation on %s (%d examples):\n%s", cfg.data.eval_file, len(data.eval), format_table(report))

    # Save: the adapter folder describes itself and replaces the old one in one rename.
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
        "evaluation": {k: v for k, v in (report or {}).items() if k not in ("examples", "regression")} or None,
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
        if report:
            write_json(tmp / "eval_report.json", report)
            from .report import markdown_table

            (tmp / "eval_report.md").write_text(markdown_table(report), encoding="utf-8")  # for the model card
    write_json(out_dir / "run_manifest.json", manifest)
    log.info("adapter written to %s; log in %s; wall time %.0f s", adapter_dir, log_path, manifest["wall_time_s"])
    return RunResult(adapter_dir, manifest, report)

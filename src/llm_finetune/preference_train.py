"""The preference recipe (train.objective dpo / kto / orpo / simpo): setup -> fit -> finish, as train.py, with
TRL's trainer for the objective in place of the Trainer.

    llm-finetune train --config config/dpo_config.json

- `setup`: the config, the preference data (data/preference.py: validated, every problem named file:line), the
  template on the tokenizer, the run folder locked (or the checkpoint to resume from), the model loaded and
  wrapped for the method (method.init_adapter continues from an SFT adapter).
- `fit`: TRL's trainer with this tool's engine mixed in (trainer.FinetuneTrainer: checkpoints renamed into place,
  the NaN/inf stop, metrics.jsonl and TensorBoard, Ctrl-C / SIGTERM with a checkpoint, resume, the spike guard),
  through train.train_to_the_end. The reference of DPO and KTO is the model before its first step (the base
  for a fresh adapter, the SFT model with method.init_adapter, the base weights for full fine-tuning): TRL
  scores it once before training (precompute_ref_log_probs) and the scores are cached on disk
  (reference_cache.py); TRL's copy of the adapter is then dropped, so no second copy is kept or saved.
- `finish`: the adapter folder, saved and checked as an SFT run's (train.save_adapter; the objective in its
  manifest and card), then base vs tuned preference accuracy and the task on generated answers for the
  held-out rows (evaluation/preference.py).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from transformers import ProgressCallback, set_seed

from . import cpu_memory, methods
from .artifacts import PREFERENCE_DATA, PREFERENCE_REPORT, RUN_MANIFEST
from .callbacks import NonFiniteGradientGuard, ProgressBar, training_callbacks
from .config import RunConfig
from .data.preference import prepare_preferences
from .distributed import main_process_first, processes
from .errors import MethodError
from .evaluation.preference import compare_preferences, format_preference_table
from .evaluation.score import compare_base_and_tuned, format_table, load_eval_set, options_from_config
from .hub import write_adapter_card
from .manifest import write_json
from .models import default_threads, load_model, load_tokenizer, resolve_source, run_precision
from .objectives import OBJECTIVES
from .reference_cache import COLUMNS, ROW, ReferenceCache, cache_key
from .resume import RunIdentityState, StopOnSignal, claim_run_folder, run_identity
from .saved_check import model_to_evaluate
from .train import Fit, RunResult, Setup, _manifest, save_adapter, setup_logging, train_to_the_end
from .trainer import FinetuneTrainer, epoch_steps, global_batch, trainer_options

log = logging.getLogger("llm_finetune")


def run(cfg: RunConfig, resume: str | bool | None = None, allow_changed: bool = False,
        overwrite: bool = False) -> RunResult:
    """One preference-tuning run, as the config says (the arguments as train.run's)."""
    prepared = setup(cfg, resume, allow_changed, overwrite)
    fitted = fit(prepared)
    return finish(prepared, fitted)


# ---------------------------------------------------------------------------------------------
# Setup


def setup(cfg: RunConfig, resume: str | bool | None = None, allow_changed: bool = False,
          overwrite: bool = False) -> Setup:
    started = time.time()
    threads, why = (cfg.train.num_threads, "train.num_threads") if cfg.train.num_threads else default_threads()
    torch.set_num_threads(threads)
    memory = cpu_memory.tune_for_this_run()
    cfg = cfg.resolved()
    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    with main_process_first():
        data = prepare_preferences(cfg, tokenizer)
    per_step = global_batch(cfg)
    steps = cfg.train.max_steps or epoch_steps(cfg, len(data.rows))
    method_notes = methods.preflight(cfg)
    # The regression set (general prompts with short answers, an SFT-style file) is checked before anything is
    # written and scored base vs tuned with the held-out answers, as the SFT report does.
    regression = (load_eval_set(cfg.eval.regression_file, data.encoder, "auto", on_error=cfg.data.on_error,
                                roles=cfg.data.roles)
                  if cfg.eval.regression_file and data.eval_rows else None)
    run = Setup(cfg, source, tokenizer, data, steps, methods.effective_quantization(cfg.method.name,
                cfg.model.quantization), run_precision(cfg), options_from_config(cfg.eval), regression, started=started,
                identity=run_identity(cfg, data.fingerprints), memory=memory)
    run.resume_from, run.lock, notes = claim_run_folder(cfg, run.identity, resume, allow_changed, overwrite)
    try:
        run.log_path = setup_logging(Path(cfg.output.logs_dir), append=bool(resume), main=processes().is_main)
        o = OBJECTIVES[cfg.train.objective]
        log.info("llm-finetune run: objective=%s (%s) method=%s model=%s", o.name, o.summary, cfg.method.name,
                 source.hub_id or source.load_path)
        for note in method_notes + notes:
            log.info("note: %s", note)
        s = data.train_stats
        log.info("data: %d preference rows kept of %d read (%d dropped: too long or invalid), %d held out",
                 s.kept, s.rows, s.skipped, len(data.eval_rows))
        log.info("plan: %d steps of %d rows, learning rate %g, beta %g; threads %d (%s); dropout off while "
                 "training (TRL's default: policy and reference score alike)", steps, per_step, cfg.learning_rate,
                 _beta(cfg), threads, why)
        log.info("precision: %s (model.dtype=%s)", run.precision.why, cfg.model.dtype)
        log.info("memory: %s", cpu_memory.describe(run.memory))
        set_seed(cfg.train.seed)
        model = load_model(source, run.precision, run.quantization, cfg.model.trust_remote_code,
                           cfg.model.revision, tokenizer=tokenizer, allow_pickle=cfg.model.allow_pickle)
        run.model = methods.apply_method(model, cfg.method, total_steps=steps, tokenizer=tokenizer,
                                         tokenizer_path=source.load_path,
                                         gradient_checkpointing=cfg.train.gradient_checkpointing,
                                         trainable_token_indices=data.added_tokens or None,
                                         allow_pickle=cfg.model.allow_pickle)
        run.parameters = methods.count_parameters(run.model)
    except BaseException:
        if run.lock:
            run.lock.release()
        raise
    return run


def _beta(cfg: RunConfig) -> float:
    return cfg.preference.beta if cfg.preference.beta is not None else OBJECTIVES[cfg.train.objective].beta


# ---------------------------------------------------------------------------------------------
# Fit


def _trl(objective: str):
    """(trainer class, config class, options) for the objective: TRL's, imported only for a preference run."""
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # pinned (requirements.txt) and tested here
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


def objective_options(cfg: RunConfig) -> dict[str, Any]:
    """TRL config keywords for the objective's preference.* options (their defaults filled in)."""
    p, name = cfg.preference, cfg.train.objective
    o = OBJECTIVES[name]
    options: dict[str, Any] = {"beta": _beta(cfg), "max_length": cfg.data.max_length, "remove_unused_columns": False,
                               "gradient_checkpointing": cfg.train.gradient_checkpointing}
    if o.reference:  # scored once before training (reference_cache.py), not on every step
        options["precompute_ref_log_probs"] = True
    if name == "dpo":
        options.update(loss_type=p.loss_type or o.loss_types[0], label_smoothing=p.label_smoothing)
    elif name == "kto":
        options.update(loss_type=p.loss_type or o.loss_types[0], desirable_weight=p.desirable_weight,
                       undesirable_weight=p.undesirable_weight,
                       train_sampling_strategy="sequential")  # TRL's KTO needs it; the rows are shuffled by seed
    elif name == "simpo":
        options.update(loss_type="simpo", simpo_gamma=p.simpo_gamma, cpo_alpha=0.0, label_smoothing=p.label_smoothing)
    return options


def build_preference_trainer(run: Setup, extra_callbacks: list) -> FinetuneTrainer:
    cfg, data = run.cfg, run.data
    o = OBJECTIVES[cfg.train.objective]
    base, config_class = _trl(o.name)
    has_eval = bool(cfg.train.eval_steps and data.eval_rows)
    args = config_class(**{**trainer_options(cfg, run.steps, cfg.learning_rate, has_eval), **objective_options(cfg)})
    if o.name == "kto" and cfg.train.batch_size < 2:
        raise MethodError("train.objective=kto needs train.batch_size of 2 or more (its KL term pairs each prompt "
                          "with another answer of the batch)")
    train_rows = [r.trl_row(cfg.data.system_prompt) for r in data.rows]
    eval_rows = [r.trl_row(cfg.data.system_prompt) for r in data.eval_rows] if has_eval else []
    cache = cached = None
    if o.reference and cfg.preference.cache_reference:
        cache = ReferenceCache(*cache_key(cfg, run.source, run.tokenizer, run.precision, train_rows, eval_rows), o.name)
        cached = cache.read()
    train_dataset = Dataset.from_list([{**row, ROW: i} for i, row in enumerate(train_rows)])
    eval_dataset = Dataset.from_list([{**row, ROW: i} for i, row in enumerate(eval_rows)]) if has_eval else None
    if cached:
        train_dataset = cache.attach(train_dataset, cached.get("train"))
        eval_dataset = cache.attach(eval_dataset, cached.get("eval"))
    if processes().world_size > 1:  # TRL's reference pass shares its result through the dataset's cache files
        train_dataset, eval_dataset = _on_shared_disk(Path(cfg.output.dir), train_dataset, eval_dataset)
    # The engine (checkpoints, guards, resume) first in the method order, TRL's trainer for the loss and data;
    # evaluation is TRL's (it computes the preference metrics on the eval rows).
    overrides = {"evaluate": base.evaluate}
    if o.reference:
        overrides["_precompute_ref_logps"] = _reference_from_cache(base, o.name)
    trainer_class = type(f"{base.__name__}WithEngine", (FinetuneTrainer, base), overrides)
    trainer = trainer_class(
        model=run.model, args=args, processing_class=run.tokenizer, train_dataset=train_dataset,
        eval_dataset=eval_dataset, callbacks=training_callbacks(cfg, run.model, Path(cfg.output.logs_dir),
                                                                run.resume_from is not None) + extra_callbacks)
    if cache and not cached and processes().is_main:
        cache.write({"train": trainer.train_dataset, "eval": trainer.eval_dataset})
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        # TRL copies the adapter as it was before training to score the reference; those scores are taken
        # (precompute_ref_log_probs), so the copy is dropped: not kept in memory, not saved.
        model.delete_adapter("ref")
        model.set_adapter("default")
    trainer.example_sources = [r.source for r in data.rows]  # a stopped step names its rows (file:line)
    trainer.example_column = ROW
    trainer.add_callback(NonFiniteGradientGuard(trainer))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())
    return trainer


def _on_shared_disk(out_dir: Path, *datasets):
    """Several processes: the datasets written by the main process under output.dir and read back by all, so
    their cache files (where TRL's reference pass leaves its scores for the other processes) are shared; an
    in-memory dataset keeps them in a temporary folder of each process."""
    folder = out_dir / PREFERENCE_DATA
    with main_process_first():
        if processes().is_main:
            for name, ds in zip(("train", "eval"), datasets):
                if ds is not None:
                    ds.save_to_disk(str(folder / name))
    return tuple(load_from_disk(str(folder / name)) if ds is not None else None
                 for name, ds in zip(("train", "eval"), datasets))


def _reference_from_cache(base, objective: str):
    """TRL's reference pass, skipped for a dataset that already holds the scores (read from the cache)."""
    def precompute(self, dataset, name, batch_size):
        if COLUMNS[objective][0] in dataset.column_names:
            return dataset
        return base._precompute_ref_logps(self, dataset, name, batch_size)

    return precompute


def fit(run: Setup) -> Fit:
    stop = StopOnSignal()
    trainer = build_preference_trainer(run, [RunIdentityState(run.identity), stop])
    return train_to_the_end(run, trainer, stop)


# ---------------------------------------------------------------------------------------------
# Finish


def finish(run: Setup, fitted: Fit) -> RunResult:
    try:
        return _save_and_evaluate(run, fitted)
    finally:
        if run.lock:
            run.lock.release()


def _save_and_evaluate(run: Setup, fitted: Fit) -> RunResult:
    cfg, data = run.cfg, run.data
    out_dir = Path(cfg.output.dir)
    manifest = _manifest(run, fitted)
    manifest["objective"] = {"name": cfg.train.objective, "beta": _beta(cfg), "options": objective_options(cfg)}
    adapter_dir = out_dir / cfg.output.adapter_name
    if not processes().is_main:
        return RunResult(adapter_dir, manifest, None)
    save_adapter(run, fitted, manifest)
    report = None
    rows = data.eval_rows[:cfg.eval.max_examples] if cfg.eval.max_examples else data.eval_rows
    if rows:
        model = model_to_evaluate(run, fitted)
        base_model = None
        if cfg.method.name == "full":  # the weights changed in place: the base is a fresh copy from disk
            base_model = load_model(run.source, run.precision, "none", cfg.model.trust_remote_code,
                                    cfg.model.revision, tokenizer=data.encoder.tokenizer)
        base = (lambda: nullcontext(base_model)) if base_model is not None else model.disable_adapter
        report = compare_preferences(model, data.encoder, rows, _beta(cfg), base, cfg.eval.batch_size)
        log.info("preference evaluation on %d held-out pairs:\n%s", report["n"], format_preference_table(report))
        # The task on generated answers: each held-out prompt answered by base and tuned, scored against the
        # chosen answer (format accuracy, lengths, the headline metric), as the SFT report does.
        examples = [r.chosen for r in rows]
        generated = compare_base_and_tuned(model, data.encoder, examples, [data.encoder.encode(e) for e in examples],
                                           options=run.eval_options, regression=run.regression,
                                           base_model=base_model)
        report["generation"] = {k: v for k, v in generated.items() if k not in ("examples", "regression")}
        if "regression" in generated:
            report["regression"] = {k: v for k, v in generated["regression"].items() if k != "examples"}
        log.info("answers generated for the held-out prompts (reference: the chosen answer):\n%s",
                 format_table(generated))
        write_json(out_dir / PREFERENCE_REPORT, report)
        write_json(adapter_dir / PREFERENCE_REPORT, report)
        manifest["evaluation"] = {k: v for k, v in report.items() if k not in ("generation", "regression")}
    manifest["wall_time_s"] = round(time.time() - run.started, 1)
    write_json(adapter_dir / RUN_MANIFEST, manifest)
    write_json(out_dir / RUN_MANIFEST, manifest)
    write_adapter_card(adapter_dir)  # the card again, now with the preference table and the final manifest
    log.info("run done: adapter in %s; wall time %.0f s", adapter_dir, manifest["wall_time_s"])
    return RunResult(adapter_dir, manifest, report)

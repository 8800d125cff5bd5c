"""The training recipe: setup -> fit -> finish. Read it top to bottom.

    llm-finetune train --config config/lora_config.json [--set train.learning_rate=1e-4]

- `setup` checks everything that can be checked without weights (config, data, template, what
  this machine can run, the eval settings) before any output folder is created, so bad input never
  leaves half-written outputs; then it opens the log, loads the model and wraps it for the method.
- `fit` trains with the stock transformers Trainer (trainer.py adds what it lacks).
- `finish` saves first: the adapter folder describes itself and replaces the old one in one rename,
  so nothing after training that can fail (evaluation, leak check, report) can cost the adapter.
  Then it evaluates base vs tuned on the held-out set and adds the results to the saved folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from . import cpu_memory, methods
from .artifacts import RUN_CONFIG, RUN_MANIFEST
from .attention import use_padding_free_attention
from .config import RunConfig
from .data.prepare import PreparedData, prepare_data
from .distributed import launch_problems, main_process_first, processes
from .errors import ConfigError, DataError, MethodError, TrainingInterrupted
from .evaluation.report import add_context, write_into_adapter, write_report
from .evaluation.score import EvalOptions, compare_base_and_tuned, format_table, load_eval_set, options_from_config
from .hub import describe_adapter_folder, write_adapter_card
from .manifest import atomic_dir, package_versions, write_json, write_jsonl
from .models import ModelSource, Precision, default_threads, load_model, load_tokenizer, resolve_source, run_precision
from .quiet import relay_into
from .resume import (
    LossSpike,
    RunIdentityState,
    RunLock,
    SpikeGuard,
    StopOnSignal,
    claim_run_folder,
    disk_full,
    run_identity,
)
from .saved_check import check_reload, check_shapes, fixed_batch_loss, full_state_dict, model_to_evaluate, reloader
from .trainer import build_trainer, global_batch, mark_best_checkpoint, plan_steps

log = logging.getLogger("llm_finetune")


@dataclass
class Setup:
    """Everything decided before training: the resolved config, the data, the plan, the wrapped model."""

    cfg: RunConfig  # resolved: the method's learning rate filled in (what run_config.json records)
    source: ModelSource
    tokenizer: Any
    data: PreparedData
    steps: int
    quantization: str
    precision: Precision  # models.run_precision: decided once, used for loading, the log and the manifest
    eval_options: EvalOptions
    regression: tuple | None  # the regression set (examples, encodings), when eval.regression_file is set
    model: Any = None
    parameters: tuple[int, int] = (0, 0)  # trainable, total
    log_path: Path | None = None
    started: float = 0.0
    identity: dict[str, Any] | None = None  # resolved config + data fingerprints, written into every checkpoint
    resume_from: Path | None = None  # the checkpoint to continue from (--resume)
    lock: RunLock | None = None  # held on output.dir from setup to the end of finish (or a failure)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)  # the allocator settings (cpu_memory.py)

    @property
    def fixed_rows(self) -> list:
        """A fixed batch (the first held-out rows, else the first training rows) for the saved-adapter check."""
        return (self.data.eval or self.data.train)[:4]


@dataclass
class Fit:
    """What training did."""

    model: Any
    steps: int
    final_loss: float
    tokens_seen: int
    runtime_s: float
    best: dict[str, Any] | None  # the best checkpoint (train.eval_steps with load_best_at_end)
    loss_spikes: list[dict[str, Any]]  # the steps the spike guard skipped (train.spike_guard)
    full_weights: dict[str, Any] | None = None  # gathered from every process where training was sharded
    fixed_batch_loss: float | None = None  # the trained model's, for the reload check (output.verify_reload)
    peak_rss_gb: float | None = None  # this process's peak resident memory up to the end of training


@dataclass
class RunResult:
    adapter_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any] | None


def run(cfg: RunConfig, resume: str | bool | None = None, allow_changed: bool = False,
        overwrite: bool = False) -> RunResult:
    """One fine-tuning run, as the config says. `resume`: True continues from the newest complete
    checkpoint in output.dir, a path from that checkpoint; `allow_changed` lets it continue although the
    config or the data changed since (each change is logged); `overwrite` starts over in a folder that
    holds an unfinished run (its checkpoints are removed)."""
    prepared = setup(cfg, resume, allow_changed, overwrite)
    fitted = fit(prepared)
    return finish(prepared, fitted)


# ---------------------------------------------------------------------------------------------
# Setup


def setup(cfg: RunConfig, resume: str | bool | None = None, allow_changed: bool = False,
          overwrite: bool = False) -> Setup:
    started = time.time()
    if cfg.train.objective != "sft":  # the supervised recipe; `llm-finetune train` picks the preference one
        raise ConfigError(f"train.objective={cfg.train.objective}: train with preference_train.run, not train.run")
    threads, why = (cfg.train.num_threads, "train.num_threads") if cfg.train.num_threads else default_threads()
    torch.set_num_threads(threads)
    memory = cpu_memory.tune_for_this_run()
    packing_asked = cfg.train.packing  # true, false, or null: where the method and the model can
    cfg = cfg.resolved()

    # Checked before anything is written: model source, tokenizer, data, what this machine can run,
    # the eval settings and the regression set.
    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    with main_process_first():  # several processes: the main one tokenises into the cache, the others read it
        data = prepare_data(cfg, tokenizer)
    if cfg.train.eval_steps and not (data.eval or data.selection):
        raise DataError(f"train.eval_steps={cfg.train.eval_steps}: no held-out row is left to evaluate on (every row "
                        "of the eval set was invalid or too long); fix the eval data or set train.eval_steps=null")
    steps = plan_steps(cfg, data)
    method_notes = methods.preflight(cfg)
    eval_options = options_from_config(cfg.eval)
    regression = (load_eval_set(cfg.eval.regression_file, data.encoder, cfg.data.format,
                                on_error=cfg.data.on_error, roles=cfg.data.roles)
                  if cfg.eval.regression_file and data.eval_pairs else None)
    run = Setup(cfg, source, tokenizer, data, steps, methods.effective_quantization(cfg.method.name,
                cfg.model.quantization), run_precision(cfg), eval_options, regression, started=started,
                identity=run_identity(cfg, data.fingerprints), memory=memory)
    run.resume_from, run.lock, resume_notes = claim_run_folder(cfg, run.identity, resume, allow_changed, overwrite)
    try:
        _log_and_load(run, bool(resume), resume_notes, method_notes, f"{threads} ({why})", packing_asked)
    except BaseException:
        if run.lock:
            run.lock.release()
        raise
    return run


def _log_and_load(run: Setup, resuming: bool, resume_notes: list[str], method_notes: list[str], threads: str,
                  packing_asked) -> None:
    """setup, once the run folder is locked: open the log (appended to when resuming), say the plan,
    load the model and wrap it for the method."""
    cfg, source, tokenizer, data, steps = run.cfg, run.source, run.tokenizer, run.data, run.steps
    run.log_path = setup_logging(Path(cfg.output.logs_dir), append=resuming, main=processes().is_main)
    _log_plan(run, method_notes)
    for note in resume_notes:
        log.warning("resume: %s", note)
    if run.resume_from:
        log.info("resume: continuing from %s", run.resume_from)
    log.info("threads: %s", threads)
    log.info("memory: %s", cpu_memory.describe(run.memory))

    set_seed(cfg.train.seed)  # adapter initialisation is part of the run's reproducible state
    model = load_model(source, run.precision, run.quantization, cfg.model.trust_remote_code,
                       cfg.model.revision, tokenizer=tokenizer,  # fp32 where weights train in full
                       allow_pickle=cfg.model.allow_pickle)
    run.model = methods.apply_method(model, cfg.method, total_steps=steps, tokenizer=tokenizer,
                                     tokenizer_path=source.load_path,
                                     gradient_checkpointing=cfg.train.gradient_checkpointing,
                                     trainable_token_indices=data.added_tokens or None,
                                     allow_pickle=cfg.model.allow_pickle)
    if cfg.packing and (why_not := use_padding_free_attention(run.model)):
        if packing_asked:
            raise MethodError(f"train.packing=true: {why_not}; set train.packing=false (or null)")
        log.info("batches: padded rows after all: %s", why_not)
        run.cfg = cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=False))
    run.parameters = methods.count_parameters(run.model)
    trainable, total = run.parameters
    log.info("parameters: %d trainable of %d (%.3f%%)", trainable, total, 100 * trainable / total)


def setup_logging(logs_dir: Path, append: bool = False, main: bool = True) -> Path:
    """The run's readable log, logs_dir/training.log (appended to when resuming); library notices held since
    the CLI started land in it. Written by the main process only: the others log errors alone."""
    path = logs_dir / "training.log"
    for h in list(log.handlers):
        if getattr(h, "_llm_finetune", False):
            log.removeHandler(h)
            h.close()
    if not main:
        log.setLevel(logging.ERROR)
        return path
    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._llm_finetune = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    relay_into(handler)  # see quiet.py
    return path


def _log_plan(run: Setup, method_notes: list[str]) -> None:
    """What the run is about to do, and every row it will not use (rejected_rows.jsonl)."""
    cfg, data, source = run.cfg, run.data, run.source
    stats = data.train_stats
    log.info("llm-finetune run: method=%s model=%s (%s)", cfg.method.name, source.hub_id or source.load_path,
             source.kind)
    for note in source.notes:
        log.info("model source: %s", note)
    for note in method_notes:
        log.info("method: %s", note)
    for problem in data.info.get("file_problems", []):  # first: the file itself is damaged (on_error: skip)
        log.warning("data: FILE PROBLEM %s; the rows before it were used", problem)
    log.info("data: %d training examples kept of %d (%d truncated, %d skipped), %d tokens, %d trained tokens",
             stats.kept, stats.examples, stats.truncated, len(stats.skipped or []), stats.tokens, stats.trained_tokens)
    if data.selection:
        log.info("selection: %d rows held out of training (data.selection_fraction) for train.eval_steps: the best "
                 "checkpoint and early stopping use them, not the eval set the report scores", len(data.selection))
    for s in (stats.skipped or [])[:20]:
        log.warning("skipped %s: %s", s.source, s.reason)
    if data.rejects and processes().is_main:
        rejected_path = Path(cfg.output.logs_dir) / "rejected_rows.jsonl"
        write_jsonl(rejected_path, data.rejects)
        log.warning("data: %d row(s) not used (invalid, too long, no trained token or duplicate); each with its "
                    "reason in %s", len(data.rejects), rejected_path)
    for f in data.info.get("ignored_files", []):
        log.warning("data: ignored %s (not a supported data file type)", f)
    if data.added_tokens:
        log.info("template %s: added special tokens %s (ids %s) to the tokenizer; their embedding rows are "
                 "trained and saved with the adapter", cfg.data.template, data.info["added_tokens"], data.added_tokens)
    log.info("plan: %d steps of %d examples (%d per process x %d accumulation x %d process(es)), learning rate %g",
             run.steps, global_batch(cfg), cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
             processes().world_size, cfg.learning_rate)
    if warning := launch_problems()[1]:
        log.warning("processes: %s", warning)
    log.info("precision: %s (model.dtype=%s)", run.precision.why, cfg.model.dtype)
    log.info("batches: %s", "padding-free: each batch's examples packed in one row, attention within each example "
             "(train.packing)" if cfg.packing else "right-padded rows with an attention mask (train.packing=false)")


# ---------------------------------------------------------------------------------------------
# Fit


def fit(run: Setup) -> Fit:
    cfg = run.cfg
    stop = StopOnSignal()
    trainer = build_trainer(cfg, run.model, run.tokenizer, run.data, run.steps, cfg.learning_rate,
                            Path(cfg.output.logs_dir), resuming=run.resume_from is not None,
                            extra_callbacks=[RunIdentityState(run.identity), stop])
    return train_to_the_end(run, trainer, stop)


def train_to_the_end(run: Setup, trainer, stop: StopOnSignal) -> Fit:
    """Train with `trainer` (any Trainer with this tool's engine: trainer.FinetuneTrainer, or a preference trainer
    built on it): the spike guard, a clean stop on a signal, the run folder unlocked on any failure, a full disk
    named; then the trained model (sharded weights gathered) and what training did."""
    cfg = run.cfg
    guard = SpikeGuard(trainer, cfg.train.spike_guard, cfg.train.spike_window, cfg.train.spike_max_skips) \
        if cfg.train.spike_guard else None
    if guard:
        trainer.add_callback(guard)
    try:
        output = _train_with_rollbacks(trainer, run.resume_from)
        if stop.received:
            checkpoint = Path(cfg.output.dir) / f"checkpoint-{trainer.state.global_step}"
            log.warning("%s: stopped after step %d; checkpoint %s", stop.received, trainer.state.global_step,
                        checkpoint)
            raise TrainingInterrupted(
                f"training stopped by {stop.received} after step {trainer.state.global_step} of {run.steps}; a "
                f"resumable checkpoint is in {checkpoint}. Continue with the same command plus --resume "
                f"(llm-finetune train --config <config> --resume)")
    except BaseException as e:
        if run.lock:
            run.lock.release()  # the folder is free for --resume
        full = disk_full(e, Path(cfg.output.dir))
        if full:
            raise full from None
        raise
    finally:
        stop.restore()  # also when training raised: Ctrl-C is the default again
    fitted = Fit(trainer.accelerator.unwrap_model(trainer.model), trainer.state.global_step, output.training_loss,
                 int(trainer.state.num_input_tokens_seen), output.metrics["train_runtime"],
                 mark_best_checkpoint(trainer, Path(cfg.output.dir)), list(guard.skipped.values()) if guard else [],
                 full_weights=full_state_dict(trainer), peak_rss_gb=cpu_memory.peak_rss_gb())
    sharded = fitted.full_weights is not None
    if cfg.output.verify_reload == "always" or (cfg.output.verify_reload == "auto" and sharded):
        fitted.fixed_batch_loss = fixed_batch_loss(trainer.model, run.fixed_rows, run.tokenizer.pad_token_id)
    log.info("training done: %d steps, final loss %.4f, %d tokens seen, %.0f s, peak memory %s GB", fitted.steps,
             fitted.final_loss, fitted.tokens_seen, fitted.runtime_s, fitted.peak_rss_gb)
    if fitted.best:
        best = fitted.best
        log.info("best checkpoint: %s (step %s, eval loss %.4f)%s", best["checkpoint"], best["step"],
                 best["eval_loss"], "; it is the final adapter" if best["final_adapter_is_best"] else "")
    return fitted


def _train_with_rollbacks(trainer, resume_from: Path | None):
    """trainer.train; after a loss spike (train.spike_guard) it continues from the checkpoint the guard
    rolls back to, and the guard skips the spike's batch when the replay reaches it."""
    while True:
        try:
            return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except LossSpike as spike:
            log.warning("%s: rolling back to %s", spike, spike.checkpoint)
            resume_from = spike.checkpoint


# ---------------------------------------------------------------------------------------------
# Finish


def finish(run: Setup, fitted: Fit) -> RunResult:
    """Save, evaluate, report; the run folder's lock is released at the end, whatever happens."""
    try:
        return _save_and_evaluate(run, fitted)
    finally:
        if run.lock:
            run.lock.release()


def _save_and_evaluate(run: Setup, fitted: Fit) -> RunResult:
    cfg, data = run.cfg, run.data
    out_dir = Path(cfg.output.dir)
    manifest = _manifest(run, fitted)
    adapter_dir = out_dir / cfg.output.adapter_name
    if not processes().is_main:  # the main process saves, evaluates and reports; the others are done
        return RunResult(adapter_dir, manifest, None)
    save_adapter(run, fitted, manifest)

    report = None
    if data.eval_pairs:
        fitted.model = model_to_evaluate(run, fitted)
        try:
            report = evaluate_run(run, fitted)
        except Exception:
            log.exception("evaluation failed; the trained adapter is saved in %s", adapter_dir)
            raise
        write_into_adapter(adapter_dir, report)
        manifest["evaluation"] = {k: v for k, v in report.items() if k not in ("examples", "regression")}
    elif data.eval:
        log.warning("evaluation: the %d held-out rows are plain text (no prompt to answer): only the in-training "
                    "eval loss covers them; no report", len(data.eval))
    manifest["wall_time_s"] = round(time.time() - run.started, 1)
    write_json(adapter_dir / RUN_MANIFEST, manifest)
    write_json(out_dir / RUN_MANIFEST, manifest)
    if report:
        write_adapter_card(adapter_dir)  # the card again, now with the evaluation table and final manifest
    log.info("run done: adapter in %s; log in %s; wall time %.0f s", adapter_dir, run.log_path, manifest["wall_time_s"])
    return RunResult(adapter_dir, manifest, report)


def save_adapter(run: Setup, fitted: Fit, manifest: dict[str, Any]) -> None:
    """The adapter folder (main process): the weights (gathered where training was sharded) shape-checked, and
    reloaded and compared where output.verify_reload asks, then the tokenizer, config, manifest and card; it
    replaces the old folder in one rename, so a failed check keeps the old one."""
    cfg, data = run.cfg, run.data
    adapter_dir = Path(cfg.output.dir) / cfg.output.adapter_name
    with atomic_dir(adapter_dir, overwrite=cfg.output.overwrite) as tmp:
        # Added tokens: only their trained rows are saved (PEFT's trainable tokens), not the whole
        # resized embedding matrix PEFT would otherwise copy; `generate` resizes the base first.
        options = {"save_embedding_layers": False} if data.added_tokens else {}
        fitted.model.save_pretrained(tmp, **options, **({"state_dict": fitted.full_weights}
                                                         if fitted.full_weights is not None else {}))
        run.tokenizer.save_pretrained(tmp)
        manifest["saved_check"] = {"tensors": check_shapes(tmp, fitted.model, options),
                                   "sharded": fitted.full_weights is not None, "reload": None}
        if fitted.fixed_batch_loss is not None:  # before the folder gets its name: a failure keeps the old one
            loss = partial(fixed_batch_loss, rows=run.fixed_rows, pad_token_id=run.tokenizer.pad_token_id)
            manifest["saved_check"]["reload"] = check_reload(tmp, fitted.fixed_batch_loss, reloader(run), loss)
        write_json(tmp / RUN_CONFIG, cfg.to_dict())
        write_json(tmp / RUN_MANIFEST, manifest)
        describe_adapter_folder(tmp)  # base named by its Hub id, our model card as README.md
    write_json(adapter_dir.parent / RUN_MANIFEST, manifest)
    log.info("adapter written to %s", adapter_dir)


def _manifest(run: Setup, fitted: Fit) -> dict[str, Any]:
    """run_manifest.json: what was trained, on what, how, with which versions (evaluation added later)."""
    cfg, data = run.cfg, run.data
    trainable, total = run.parameters
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": cfg.method.name,
        "quantization": run.quantization,
        "precision": run.precision.to_dict(),
        "memory": {**run.memory, "peak_rss_gb": fitted.peak_rss_gb},  # peak: this process, to the end of training
        "merge": methods.METHODS[cfg.method.name].merge,
        "model": run.source.to_dict(),
        "data": {**data.fingerprints, "train": data.train_stats.to_dict(), "eval_examples": len(data.eval),
                 "shuffle_seed": cfg.data.shuffle_seed, "template_end_of_turn": data.encoder.end_of_turn,
                 **data.info},
        "processes": {"world_size": processes().world_size, "per_device_batch": cfg.train.batch_size,
                      "gradient_accumulation": cfg.train.gradient_accumulation_steps,
                      "global_batch": global_batch(cfg)},
        "training": {"steps": fitted.steps, "learning_rate": cfg.learning_rate, "seed": cfg.train.seed,
                     "tokens_seen": fitted.tokens_seen, "final_loss": fitted.final_loss,
                     "trainable_parameters": trainable, "total_parameters": total,
                     "train_runtime_s": fitted.runtime_s, "loss_spikes": fitted.loss_spikes},
        "wall_time_s": round(time.time() - run.started, 1),
        "versions": package_versions(),
        "evaluation": None,  # filled in once the saved adapter is evaluated
        "best_checkpoint": fitted.best,
    }


def evaluate_run(run: Setup, fitted: Fit) -> dict[str, Any]:
    """Base vs tuned on the held-out rows (in eval mode), the leak check against the examples actually
    trained, and report.md / report.json / plots in output.dir."""
    cfg, data, e = run.cfg, run.data, run.cfg.eval
    base_model = None
    if cfg.method.name == "full" and e.compare_base:
        # Full fine-tuning changed the weights in place: the base is a fresh copy from disk, loaded as
        # the tuned model was (fp32 master weights), so both sides of the table compute in one precision.
        base_model = load_model(run.source, run.precision, "none", cfg.model.trust_remote_code,
                                cfg.model.revision, tokenizer=data.encoder.tokenizer,
                                allow_pickle=cfg.model.allow_pickle)
    examples = [ex for ex, _ in data.eval_pairs]
    encoded = [enc for _, enc in data.eval_pairs]
    report = compare_base_and_tuned(fitted.model, data.encoder, examples, encoded, e.metric, e.max_new_tokens,
                                    e.batch_size, e.compare_base, run.eval_options, run.regression,
                                    base_model=base_model)
    del base_model
    # Without a selection set, the best checkpoint was chosen on data.eval: the set this report scores.
    add_context(report, cfg, examples, run.source, fitted.best, trained=data.trained_index,
                best_on_same_set=not data.selection)
    if e.report:
        paths = write_report(report, Path(cfg.output.dir), Path(cfg.output.logs_dir) / "metrics.jsonl")
        log.info("report written to %s", paths["md"])
    log.info("evaluation on %s (%d examples):\n%s", cfg.data.eval_file, len(examples), format_table(report))
    return report

"""`llm-finetune eval`: score two runs side by side on a held-out set and write the report.

    llm-finetune eval                                   # base vs this config's adapter
    llm-finetune eval --adapter runs/a/adapter_model    # base vs that adapter
    llm-finetune eval --adapter runs/a/adapter_model --adapter runs/b/adapter_model   # A vs B
    llm-finetune eval --adapter runs/b/adapter_model --against runs/a/adapter_model   # the same

One copy of the base model carries both adapters (PEFT named adapters), so the two sides share the
prompts, the template (the newer side's tokenizer) and the generation settings.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import RUN_MANIFEST, open_adapter, read_json
from ..config import ConfigError, RunConfig, load_config
from ..data.cache import source_fingerprint
from ..data.prepare import trained_examples
from ..data.rows import is_hub_name
from ..data.tokenize import encoder_for
from ..errors import EvalSetupError
from ..models import load_model, load_tokenizer, resolve_source, run_precision
from .leakage import TrainIndex
from .report import add_context, write_report
from .score import compare_models, load_eval_set, options_from_config


@dataclass
class Side:
    name: str
    adapter: Path | None  # None = the base model

    @property
    def label(self) -> str:
        return f"adapter {self.adapter}" if self.adapter else "base model (no adapter)"


def _check_adapter(path: str | Path, allow_pickle: bool = False) -> Path:
    return open_adapter(path, "--adapter", allow_pickle).path


def plan_sides(cfg: RunConfig, adapters: list[str], against: str | None) -> list[Side]:
    """(before, after): what is compared with what, from --adapter (0-2 times) and --against."""
    if len(adapters) > 2:
        raise EvalSetupError(f"--adapter given {len(adapters)} times; compare at most two runs")
    if len(adapters) == 2:
        if against:
            raise EvalSetupError("use either two --adapter or one --adapter with --against, not both")
        a, b = (_check_adapter(p, cfg.model.allow_pickle) for p in adapters)
        return [Side("A", a), Side("B", b)]
    after = _check_adapter(adapters[0] if adapters else Path(cfg.output.dir) / cfg.output.adapter_name,
                           cfg.model.allow_pickle)
    if against in (None, "base"):
        return [Side("base", None), Side("tuned", after)]
    return [Side("A", _check_adapter(against, cfg.model.allow_pickle)), Side("B", after)]


def _changed_files(files: list, recorded: dict[str, Any]) -> list[str]:
    """The training sources whose content differs from the hashes the run recorded (none recorded: none)."""
    before = recorded.get("train_files") or ([recorded["train_file"]] if recorded.get("train_file") else [])
    changed = []
    for f, old in zip(files, before):
        sha = old.get("sha256") if isinstance(old, dict) else None
        if sha and source_fingerprint(f)["sha256"] != sha:
            changed.append(str(f))
    return changed


def trained_reference(adapter: Path, trust_remote_code: bool = False):
    """The leak check's reference for an adapter: its run's trained examples, re-derived from the
    run_config.json in its folder by the data step training used (same split, weights, de-duplication
    and tokenizer). Returns (TrainIndex or None, note): a missing or changed training set is a note in
    the report, never a failure of the evaluation."""
    run_config = adapter / "run_config.json"
    if not run_config.is_file():
        return None, f"{adapter} has no run_config.json, so the examples it was trained on are unknown"
    try:
        run_cfg = load_config(run_config)
    except ConfigError as e:
        return None, f"{run_config} does not load ({e}), so the examples it was trained on are unknown"
    d = run_cfg.data
    files = d.train_file if isinstance(d.train_file, list) else [d.train_file]
    gone = [str(f) for f in files if not is_hub_name(f) and not Path(f).exists()]
    if gone:
        return None, f"the run's training data is gone ({', '.join(gone)}, per {run_config})"
    changed = _changed_files(files, (read_json(adapter / RUN_MANIFEST) or {}).get("data", {}))
    try:
        tokenizer = load_tokenizer(open_adapter(adapter, allow_pickle=True)  # its tokenizer only, no weights
                                   .tokenizer_path(run_cfg.model.name_or_path),
                                   trust_remote_code)
        examples = trained_examples(run_cfg, tokenizer)
    except Exception as e:  # noqa: BLE001 - a leak check that cannot run is reported, not fatal
        return None, f"the trained examples could not be re-derived from {run_config}: {e}"
    note = (f"the training data changed since the run ({', '.join(changed)}: content hash differs); compared "
            "with its current content" if changed else None)
    return TrainIndex.build(examples), note


def _best_on_this_set(adapter: Path, eval_file: str) -> tuple[dict | None, bool]:
    """The best-checkpoint record of the adapter's run, and whether it was chosen on `eval_file`."""
    manifest = (read_json(adapter / RUN_MANIFEST) or {})
    best = manifest.get("best_checkpoint")
    if not best:
        return None, False
    data = manifest.get("data", {})
    if data.get("split", {}).get("selection_source") == "fraction":
        return best, False  # chosen on rows held out of training for it (data.selection_fraction)
    chosen_on = data.get("eval_file") or {}
    if not chosen_on:
        return best, False  # no eval file recorded: the choice was made on held-out training rows
    try:
        same = bool(chosen_on.get("sha256")) and chosen_on["sha256"] == source_fingerprint(eval_file)["sha256"]
    except OSError:
        same = False
    return best, same or str(chosen_on.get("path")) == str(eval_file)


def run_eval(cfg: RunConfig, adapters: list[str] | None = None, against: str | None = None,
             eval_file: str | None = None, out_dir: str | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    from peft import PeftModel  # imports a good part of PEFT: only when an evaluation runs

    sides = plan_sides(cfg, list(adapters or []), against)
    eval_file = eval_file or cfg.data.eval_file
    if not eval_file:
        raise EvalSetupError("no held-out set: pass --eval-file FILE or set data.eval_file in the config")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_file=eval_file))  # the caller's stays
    options = options_from_config(cfg.eval)

    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    newest = sides[-1].adapter
    tok_path = (open_adapter(newest, allow_pickle=cfg.model.allow_pickle).tokenizer_path(source.load_path)
                if newest else source.load_path)
    tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)
    d = cfg.data
    _, encoder = encoder_for(d, tokenizer)
    examples, encoded = load_eval_set(eval_file, encoder, d.format, cfg.eval.max_examples, d.on_error, d.roles)
    if not examples:
        raise EvalSetupError(f"{eval_file}: no row to score: every row is plain text (no prompt to answer) or "
                             f"longer than data.max_length={d.max_length}; give prompt/answer rows or raise it")
    regression = (load_eval_set(cfg.eval.regression_file, encoder, d.format, on_error=d.on_error, roles=d.roles)
                  if cfg.eval.regression_file else None)

    model = load_model(source, run_precision(cfg), cfg.model.quantization, cfg.model.trust_remote_code,
                       cfg.model.revision, tokenizer=tokenizer, allow_pickle=cfg.model.allow_pickle)
    with_adapter = [s for s in sides if s.adapter]
    model = PeftModel.from_pretrained(model, with_adapter[0].adapter, adapter_name=with_adapter[0].name)
    for s in with_adapter[1:]:
        model.load_adapter(s.adapter, adapter_name=s.name)
    model.eval()

    def switch(side: Side):
        if side.adapter is None:
            return model.disable_adapter

        @contextmanager
        def use():
            model.set_adapter(side.name)
            yield

        return use

    report = compare_models({s.name: switch(s) for s in sides}, model, encoder, examples, encoded, options,
                            regression)
    trained, leak_note = trained_reference(newest, cfg.model.trust_remote_code) if newest else (None, None)
    best, same_set = _best_on_this_set(newest, eval_file) if newest else (None, False)
    add_context(report, cfg, examples, source, best, labels={s.name: s.label for s in sides}, trained=trained,
                leak_note=leak_note, best_on_same_set=same_set)
    out = Path(out_dir) if out_dir else (newest.parent if newest else Path(cfg.output.dir))
    metrics_log = Path(cfg.output.logs_dir) / "metrics.jsonl"
    paths = write_report(report, out, metrics_log if metrics_log.is_file() else None)
    return report, paths



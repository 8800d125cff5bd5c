"""`llm-finetune eval`: score two runs side by side on a held-out set and write the report.

    llm-finetune eval                                   # base vs this config's adapter
    llm-finetune eval --adapter runs/a/adapter_model    # base vs that adapter
    llm-finetune eval --adapter runs/a/adapter_model --adapter runs/b/adapter_model   # A vs B
    llm-finetune eval --adapter runs/b/adapter_model --against runs/a/adapter_model   # the same

One copy of the base model carries both adapters (PEFT named adapters), so the two sides share the
prompts, the template (the newer side's tokenizer) and the generation settings.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig


class EvalSetupError(ValueError):
    """Bad eval invocation (missing adapter, no eval file); the message says what to pass."""


@dataclass
class Side:
    name: str
    adapter: Path | None  # None = the base model

    @property
    def label(self) -> str:
        return f"adapter {self.adapter}" if self.adapter else "base model (no adapter)"


def _check_adapter(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        hint = " (train first: llm-finetune train)" if not path.exists() else ""
        raise EvalSetupError(f"{path}: not an adapter folder (no adapter_config.json){hint}")
    return path


def plan_sides(cfg: RunConfig, adapters: list[str], against: str | None) -> list[Side]:
    """(before, after): what is compared with what, from --adapter (0-2 times) and --against."""
    if len(adapters) > 2:
        raise EvalSetupError(f"--adapter given {len(adapters)} times; compare at most two runs")
    if len(adapters) == 2:
        if against:
            raise EvalSetupError("use either two --adapter or one --adapter with --against, not both")
        a, b = (_check_adapter(p) for p in adapters)
        return [Side("A", a), Side("B", b)]
    after = _check_adapter(adapters[0] if adapters else Path(cfg.output.dir) / cfg.output.adapter_name)
    if against in (None, "base"):
        return [Side("base", None), Side("tuned", after)]
    return [Side("A", _check_adapter(against)), Side("B", after)]


def run_eval(cfg: RunConfig, adapters: list[str] | None = None, against: str | None = None,
             eval_file: str | None = None, out_dir: str | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    from peft import PeftModel

    from .data.tokenize import ChatEncoder
    from .evaluate import compare_models, load_eval_set, options_from_config
    from .models import load_model, load_tokenizer, resolve_source
    from .report import add_context, write_report

    sides = plan_sides(cfg, list(adapters or []), against)
    eval_file = eval_file or cfg.data.eval_file
    if not eval_file:
        raise EvalSetupError("no held-out set: pass --eval-file FILE or set data.eval_file in the config")
    cfg.data.eval_file = eval_file
    options = options_from_config(cfg.eval)

    source = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision)
    newest = sides[-1].adapter
    tok_path = newest if newest and (newest / "tokenizer_config.json").is_file() else source.load_path
    tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)
    d = cfg.data
    encoder = ChatEncoder(tokenizer, d.max_length, d.truncation, d.train_on, d.system_prompt)
    examples, encoded = load_eval_set(eval_file, encoder, d.format, cfg.eval.max_examples)
    if not examples:
        raise EvalSetupError(f"{eval_file}: no example fits data.max_length={d.max_length}; raise it")
    regression = (load_eval_set(cfg.eval.regression_file, encoder, d.format)
                  if cfg.eval.regression_file else None)

    model = load_model(source, cfg.model.dtype, cfg.model.quantization, cfg.model.trust_remote_code,
                       cfg.model.revision)
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
    add_context(report, cfg, examples, source, labels={s.name: s.label for s in sides})
    out = Path(out_dir) if out_dir else (newest.parent if newest else Path(cfg.output.dir))
    metrics_log = Path(cfg.output.logs_dir) / "metrics.jsonl"
    paths = write_report(report, out, metrics_log if metrics_log.is_file() else None)
    return report, paths



"""Did the fine-tune help? Score two models (base and tuned, or any two adapters) on the same prompts.

For each model: eval loss and perplexity on the supervised tokens, greedy answers scored by every
metric in `metrics.py`, format accuracy, answer lengths, stop rate and (when asked) consistency of
k sampled answers. Then the paired difference of each, with its interval, and the examples that
changed most in both directions. `report.py` turns the result into report.md / report.json / plots.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch

from ..config import ConfigError
from ..data.collate import PaddingCollator
from ..data.records import DataError, Example, format_problems, read_examples
from ..data.tokenize import IGNORE_INDEX, ChatEncoder, Encoded
from ..generate import Generation, generate_batch
from ..head_loss import scores_where_trained, trained_token_loss_sums
from .metrics import (
    BOOLEAN_METRICS,
    TEXT_METRICS,
    FormatChecker,
    agreement,
    difference,
    distribution,
    exact_match,
    json_match,
    mean_score,
    paired_bootstrap,
    rate,
    token_weighted_difference,
    wilson_interval,
)
from .report import summary_table

__all__ = ["exact_match", "json_match", "wilson_interval", "paired_difference_interval", "eval_loss",
           "score_model", "compare_base_and_tuned", "compare_models", "format_table", "EvalOptions"]

# The headline metric of the table (`eval.metric`); every metric is computed either way.
METRICS: dict[str, Callable[[str, str], Any]] = dict(TEXT_METRICS)


def paired_difference_interval(a: list[bool], b: list[bool], resamples: int = 2000, seed: int = 0,
                               level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of mean(b) - mean(a) over the same examples (paired)."""
    return paired_bootstrap(a, b, resamples, seed, level)


@dataclass
class EvalOptions:
    """What to measure besides loss; built from the `eval` config section by `options_from_config`."""

    metric: str = "exact_match"
    max_new_tokens: int = 48
    batch_size: int = 16
    format: FormatChecker | None = None
    consistency_samples: int = 0
    consistency_temperature: float = 0.7
    seed: int = 0
    top_changed: int = 5


def load_schema(text_or_path: str | dict, where: str = "eval.schema") -> dict:
    """A JSON Schema given as an object, inline JSON text (starting with '{') or a file path."""
    if isinstance(text_or_path, dict):
        return text_or_path
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        path = Path(text_or_path)
        if not path.is_file():
            raise ConfigError(f"{where}: schema file not found: {path} (give a path or inline JSON)")
        text = path.read_text(encoding="utf-8")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON in the schema at line {e.lineno}: {e.msg}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: a JSON Schema must be an object")
    return schema


def options_from_config(e) -> EvalOptions:
    """EvalConfig -> EvalOptions; a bad schema or regex is a ConfigError naming the key."""
    import re

    checker = None
    fmt = getattr(e, "format", "none")
    if fmt == "json_schema":  # config.RunConfig.validate made sure eval.schema is set
        import jsonschema

        try:
            checker = FormatChecker("json_schema", schema=load_schema(e.schema))
        except jsonschema.SchemaError as err:
            raise ConfigError(f"eval.schema: not a valid JSON Schema: {err.message}") from None
    elif fmt == "regex":  # and eval.regex
        try:
            checker = FormatChecker("regex", regex=e.regex)
        except re.error as err:
            raise ConfigError(f"eval.regex: invalid regular expression {e.regex!r}: {err}") from None
    elif fmt == "json":
        checker = FormatChecker("json")
    return EvalOptions(metric=e.metric, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, format=checker,
                       consistency_samples=getattr(e, "consistency_samples", 0),
                       consistency_temperature=getattr(e, "consistency_temperature", 0.7),
                       seed=getattr(e, "seed", 0), top_changed=getattr(e, "top_changed", 5))


# ---------------------------------------------------------------------------------------------
# Loss


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off while scoring, and the caller's mode back afterwards.

    After `trainer.train()` a model is still in train mode: LoRA dropout (and any other dropout)
    would make losses and greedy answers random and biased. Every score is taken in eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def example_losses(model, encoded: list[Encoded] | list[dict], pad_token_id: int, batch_size: int = 16,
                   collate: Callable | None = None) -> tuple[list[float], list[int]]:
    """Summed cross-entropy and supervised-token count of each example (for per-example deltas).

    `encoded` holds `Encoded`s or feature dicts with input_ids and labels; `collate` defaults to the
    training collator, so padding and masks are those the model trained with. The head runs only at the
    trained positions (head_loss.trained_token_loss_sums), except for prompt tuning and p-tuning."""
    collate = collate or PaddingCollator(pad_token_id)
    features = [e if isinstance(e, dict) else {"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    device = next(model.parameters()).device
    where_trained = scores_where_trained(model)
    sums: list[float] = []
    counts: list[int] = []
    with eval_mode(model):
        for i in range(0, len(features), batch_size):
            batch = collate(features[i:i + batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            counts.extend((batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist())
            if where_trained:
                sums.extend(trained_token_loss_sums(model, batch["input_ids"], batch["attention_mask"],
                                                    batch["labels"]).tolist())
                continue
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            # Prompt tuning and p-tuning prepend their virtual tokens' positions to the logits.
            logits = logits[:, -batch["labels"].shape[1]:]
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
            sums.extend(loss.sum(dim=1).tolist())
    return sums, counts


def eval_loss(model, encoded: list[Encoded] | list[dict], pad_token_id: int, batch_size: int = 16,
              collate: Callable | None = None) -> dict[str, float]:
    """Mean cross-entropy over supervised tokens (token-weighted, not batch-weighted), and perplexity."""
    sums, counts = example_losses(model, encoded, pad_token_id, batch_size, collate)
    count = sum(counts)
    mean = sum(sums) / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}


# ---------------------------------------------------------------------------------------------
# One model


@dataclass
class ModelScores:
    name: str
    loss: dict[str, float]
    metric: str
    hits: list[Any]  # the headline metric per example (bool or 0..1 score)
    predictions: list[str]
    stop_rate: float
    extra: dict[str, Any] = field(default_factory=dict)
    per_example: dict[str, list] = field(default_factory=dict)  # every metric, loss, lengths, stopped

    @property
    def rate(self) -> float:
        return sum(map(float, self.hits)) / max(len(self.hits), 1)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Every measured quantity as {value, n, ci95}: rates with Wilson intervals, scores bootstrapped."""
        p = self.per_example
        out: dict[str, dict[str, Any]] = {}
        for name in TEXT_METRICS:
            out[name] = rate(p[name]) if name in BOOLEAN_METRICS else mean_score(p[name])
        if "format" in p:
            out["format"] = rate(p["format"])
        out["stop_rate"] = rate(p["stopped"])
        out["answer_tokens"] = mean_score(p["tokens"])
        out["answer_chars"] = mean_score(p["chars"])
        if "consistency" in p:
            out["consistency"] = mean_score(p["consistency"])
            out["consistency_all_agree"] = rate([a == 1.0 for a in p["consistency"]])
        return out

    def to_dict(self) -> dict[str, Any]:
        head = self.summary()[self.metric]
        return {"name": self.name, "eval_loss": self.loss["loss"], "perplexity": self.loss["perplexity"],
                "loss_tokens": self.loss["tokens"], "metric": self.metric, "score": head["value"],
                "correct": head.get("k"), "n": len(self.hits), "ci95": head["ci95"],
                "stop_rate": self.stop_rate, "metrics": self.summary(),
                "length": {"tokens": distribution(self.per_example["tokens"]),
                           "chars": distribution(self.per_example["chars"])},
                **self.extra}


def _generate_all(model, encoder: ChatEncoder, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                  **sampling) -> list[Generation]:
    # Similar lengths together: less padding. Results go back to the original order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[Any] = [None] * len(prompts)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        gens = generate_batch(model, encoder.tokenizer, [prompts[j] for j in chunk], encoder.generation_eos_ids(),
                              max_new_tokens=max_new_tokens, **sampling)
        for j, g in zip(chunk, gens):
            outputs[j] = g
    return outputs


def score_model(model, name: str, encoder: ChatEncoder, examples: list[Example], encoded: list[Encoded],
                metric: str = "exact_match", max_new_tokens: int = 48, batch_size: int = 16,
                options: EvalOptions | None = None) -> ModelScores:
    """Loss, greedy answers and every metric of `model` on `examples`, in eval mode (dropout off).

    `examples[i]` and `encoded[i]` must be the same row: per-example values are read by position."""
    opts = options or EvalOptions(metric=metric, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if opts.metric not in METRICS:
        raise ValueError(f"unknown metric {opts.metric!r}; choose one of {', '.join(METRICS)}")
    _check_pairs(examples, encoded)
    with eval_mode(model):
        return _score(model, name, encoder, examples, encoded, opts)


def _check_pairs(examples: list[Example], encoded: list[Encoded]) -> None:
    """Per-example values are paired by position: refuse lists that are not the same rows in the same order."""
    if len(examples) != len(encoded) or any(ex.source != enc.source for ex, enc in zip(examples, encoded)):
        first = next((i for i, (ex, enc) in enumerate(zip(examples, encoded)) if ex.source != enc.source),
                     min(len(examples), len(encoded)))
        raise ValueError(f"examples and encodings are not the same rows ({len(examples)} examples, "
                         f"{len(encoded)} encodings, first mismatch at position {first}); pass (example, "
                         "encoding) pairs of the rows to score, text rows left out of both")
    if any(ex.format == "text" for ex in examples):
        raise ValueError("plain text rows have no prompt to answer; leave them out of the scored examples")


def _score(model, name: str, encoder: ChatEncoder, examples: list[Example], encoded: list[Encoded],
           opts: EvalOptions) -> ModelScores:
    tokenizer = encoder.tokenizer
    sums, counts = example_losses(model, encoded, tokenizer.pad_token_id, opts.batch_size)
    total = sum(counts)
    mean = sum(sums) / max(total, 1)
    loss = {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": total}

    prompts = [encoder.encode_prompt(ex.prompt_messages) for ex in examples]
    outputs = _generate_all(model, encoder, prompts, opts.max_new_tokens, opts.batch_size)
    texts = [g.text for g in outputs]
    per: dict[str, list] = {name_: [fn(t, ex.answer) for t, ex in zip(texts, examples)]
                            for name_, fn in TEXT_METRICS.items()}
    if opts.format is not None:
        per["format"] = [opts.format(t) for t in texts]
    per["stopped"] = [g.stopped for g in outputs]
    per["tokens"] = [g.new_tokens for g in outputs]
    per["chars"] = [len(t) for t in texts]
    per["loss"] = [s / max(c, 1) for s, c in zip(sums, counts)]
    per["loss_sum"], per["loss_tokens"] = sums, counts

    if opts.consistency_samples > 1:
        k = opts.consistency_samples
        sampled = _generate_all(model, encoder, [p for p in prompts for _ in range(k)], opts.max_new_tokens,
                                opts.batch_size, do_sample=True, temperature=opts.consistency_temperature,
                                seed=opts.seed)
        per["consistency"] = [agreement([g.text for g in sampled[i * k:(i + 1) * k]]) for i in range(len(prompts))]
        per["samples"] = [[g.text for g in sampled[i * k:(i + 1) * k]] for i in range(len(prompts))]

    stop_rate = sum(per["stopped"]) / max(len(outputs), 1)
    return ModelScores(name, loss, opts.metric, per[opts.metric], texts, stop_rate, per_example=per)


# ---------------------------------------------------------------------------------------------
# Two models


def _differences(before: ModelScores, after: ModelScores) -> dict[str, Any]:
    keys = [k for k in (*TEXT_METRICS, "format", "stopped", "tokens", "chars", "consistency")
            if k in before.per_example and k in after.per_example]
    out = {("stop_rate" if k == "stopped" else "answer_tokens" if k == "tokens" else "answer_chars"
            if k == "chars" else k): difference(before.per_example[k], after.per_example[k]) for k in keys}
    out["eval_loss"] = token_weighted_difference(before.per_example["loss_sum"], after.per_example["loss_sum"],
                                                 before.per_example["loss_tokens"])
    return out


def _changed(examples: list[Example], before: ModelScores, after: ModelScores, top: int) -> dict[str, list]:
    """Examples ranked by the change in the headline metric, then chrF, then per-example loss."""
    m = before.metric
    rows = []
    for i, ex in enumerate(examples):
        pb, pa = before.per_example, after.per_example
        delta = (float(pa[m][i]) - float(pb[m][i]), pa["chrf"][i] - pb["chrf"][i], pb["loss"][i] - pa["loss"][i])
        rows.append((delta, i))
    improved = [i for d, i in sorted(rows, key=lambda r: r[0], reverse=True) if d > (0, 0, 0)][:top]
    regressed = [i for d, i in sorted(rows, key=lambda r: r[0]) if d < (0, 0, 0)][:top]
    return {"improved": improved, "regressed": regressed}


def _example_rows(examples: list[Example], results: dict[str, ModelScores]) -> list[dict[str, Any]]:
    rows = []
    for i, ex in enumerate(examples):
        prompt = ex.prompt_messages[-1]["content"] if ex.prompt_messages else ""
        row: dict[str, Any] = {"source": ex.source, "prompt": prompt, "reference": ex.answer}
        for name, s in results.items():
            p = s.per_example
            row[name] = {"prediction": s.predictions[i], s.metric: p[s.metric][i], "chrf": round(p["chrf"][i], 4),
                         "loss": round(p["loss"][i], 4), "tokens": p["tokens"][i], "stopped": p["stopped"][i]}
            if "format" in p:
                row[name]["format"] = p["format"][i]
            if "samples" in p:
                row[name]["samples"] = p["samples"][i]
        rows.append(row)
    return rows


def compare_models(sides: dict[str, Callable[[], ContextManager]], model, encoder: ChatEncoder,
                   examples: list[Example], encoded: list[Encoded], options: EvalOptions,
                   regression: tuple[list[Example], list[Encoded]] | None = None) -> dict[str, Any]:
    """Score each side (a name and a context that switches the model to it) on the same prompts and
    template. With two sides the first is 'before' and the second 'after' in every difference."""
    results: dict[str, ModelScores] = {}
    reg_results: dict[str, ModelScores] = {}
    for name, ctx in sides.items():
        with ctx() as chosen:  # a context may yield another model to score (a separate base copy)
            target = chosen if chosen is not None else model
            results[name] = score_model(target, name, encoder, examples, encoded, options=options)
            if regression and regression[0]:
                reg_opts = EvalOptions(metric="contains", max_new_tokens=options.max_new_tokens,
                                       batch_size=options.batch_size, seed=options.seed)
                reg_results[name] = score_model(target, name, encoder, *regression, options=reg_opts)
    report: dict[str, Any] = {name: s.to_dict() for name, s in results.items()}
    report["order"] = list(results)
    report["examples"] = _example_rows(examples, results)
    if len(results) == 2:
        before, after = results.values()
        diffs = _differences(before, after)
        head = diffs[before.metric]
        report["difference"] = {"score": head["value"], "ci95": head["ci95"], "eval_loss": diffs["eval_loss"]["value"],
                                "eval_loss_ci95": diffs["eval_loss"]["ci95"], "metrics": diffs}
        report["changed"] = _changed(examples, before, after, options.top_changed)
    if reg_results:
        reg = {name: s.to_dict() for name, s in reg_results.items()}
        reg["order"] = list(reg_results)
        reg["examples"] = _example_rows(regression[0], reg_results)
        if len(reg_results) == 2:
            before, after = reg_results.values()
            diffs = _differences(before, after)
            reg["difference"] = {"score": diffs["contains"]["value"], "ci95": diffs["contains"]["ci95"],
                                 "eval_loss": diffs["eval_loss"]["value"],
                                 "eval_loss_ci95": diffs["eval_loss"]["ci95"], "metrics": diffs}
        report["regression"] = reg
    return report


def compare_base_and_tuned(model, encoder: ChatEncoder, examples: list[Example], encoded: list[Encoded],
                           metric: str = "exact_match", max_new_tokens: int = 48, batch_size: int = 16,
                           compare_base: bool = True, options: EvalOptions | None = None,
                           regression: tuple[list[Example], list[Encoded]] | None = None,
                           base_model=None) -> dict[str, Any]:
    """Score the base (adapter disabled, or `base_model` when given, e.g. after full fine-tuning) and
    the tuned model on the same prompts and template."""
    opts = options or EvalOptions(metric=metric, max_new_tokens=max_new_tokens, batch_size=batch_size)
    sides: dict[str, Callable[[], ContextManager]] = {}
    if compare_base and base_model is not None:
        sides["base"] = lambda: nullcontext(base_model)
    elif compare_base:
        sides["base"] = lambda: model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    sides["tuned"] = nullcontext
    return compare_models(sides, model, encoder, examples, encoded, opts, regression)


def format_table(report: dict[str, Any]) -> str:
    """The short terminal summary (the full one is report.md)."""
    return summary_table(report)


def load_eval_set(path: str, encoder: ChatEncoder, fmt: str = "auto", max_examples: int | None = None,
                  on_error: str = "stop", roles: dict[str, str] | None = None) -> tuple[list[Example], list[Encoded]]:
    """Read and encode an eval-style file (held-out or regression set) as training's report does: the
    first `max_examples` rows, then rows too long and plain text rows (no prompt to answer) left out.
    Returns the examples and their encodings, position by position. Invalid rows stop with every problem
    listed, or are left out under on_error='skip' (as training does with data.on_error)."""
    import logging


    result = read_examples(path, fmt, roles)
    if (result.problems or result.file_problems) and on_error != "skip":
        raise DataError(format_problems(path, result.problems, result.rows, file_problems=result.file_problems))
    for problem in result.file_problems:
        logging.getLogger("llm_finetune").warning("FILE PROBLEM %s (the rows before it are scored)", problem)
    rows = result.examples
    if not rows:
        raise DataError(f"{path}: no valid examples ({result.rows} rows read, {len(result.problems)} invalid)")
    if max_examples:
        rows = rows[:max_examples]
    pairs = [(ex, e) for ex, e in zip(rows, encoder.encode_many(rows)) if isinstance(e, Encoded)]
    kept = [(ex, e) for ex, e in pairs if ex.format != "text"]
    log = logging.getLogger("llm_finetune")
    if result.problems or len(kept) < len(rows):
        log.warning("%s: scoring %d of %d rows (%d invalid, %d too long for data.max_length, %d plain text rows "
                    "without a prompt)", path, len(kept), len(rows), len(result.problems), len(rows) - len(pairs),
                    len(pairs) - len(kept))
    return [ex for ex, _ in kept], [e for _, e in kept]

"""Did preference tuning teach the preference? Base vs tuned on held-out preference rows.

- preference accuracy: the share of pairs whose chosen answer the model gives a higher log-likelihood than the
  rejected one (KTO: of prompts with both kinds, desirable answers above undesirable ones), with 95% Wilson
  intervals, and the paired bootstrap interval of the tuned - base difference;
- the tuned model's mean reward margin against its reference (the base): beta x ((log p(chosen) - log
  p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))).
Log-likelihoods are sums over the answer's trained tokens, through the training template (ChatEncoder), so
they score exactly what was trained.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

from ..data.preference import PreferenceRow
from ..data.tokenize import ChatEncoder, Encoded
from .metrics import paired_bootstrap, wilson_interval
from .score import example_losses


def _pairs(rows: list[PreferenceRow]) -> list[tuple[Any, Any]]:
    """(better, worse) conversations: each pair; for KTO rows, every desirable x undesirable answer of a prompt."""
    pairs = [(r.chosen, r.rejected) for r in rows if r.rejected is not None]
    by_prompt: dict[str, dict[bool, list]] = {}
    for r in rows:
        if r.rejected is None:
            key = repr(r.prompt)
            by_prompt.setdefault(key, {True: [], False: []})[bool(r.label)].append(r.chosen)
    for group in by_prompt.values():
        pairs += [(good, bad) for good in group[True] for bad in group[False]]
    return pairs


def encoded_pairs(encoder: ChatEncoder, rows: list[PreferenceRow]) -> list[tuple[Encoded, Encoded]]:
    """Each (better, worse) pair encoded once through the training template; pairs with an answer that does not
    fit data.max_length are left out."""
    pairs = [(encoder.encode(a), encoder.encode(b)) for a, b in _pairs(rows)]
    return [(a, b) for a, b in pairs if isinstance(a, Encoded) and isinstance(b, Encoded)]


def preference_scores(model, pairs: list[tuple[Encoded, Encoded]], pad_token_id: int, batch_size: int = 8
                      ) -> dict[str, list[float]]:
    """Sum of log-probabilities of each answer's trained tokens, for the better and the worse answer of each pair."""
    better, _ = example_losses(model, [a for a, _ in pairs], pad_token_id, batch_size)
    worse, _ = example_losses(model, [b for _, b in pairs], pad_token_id, batch_size)
    return {"better": [-s for s in better], "worse": [-s for s in worse]}


def compare_preferences(model, encoder: ChatEncoder, rows: list[PreferenceRow], beta: float,
                        base: Callable[[], ContextManager] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Base (the model inside `base()`: the adapter switched off) vs tuned on the held-out preference rows."""
    pairs, pad = encoded_pairs(encoder, rows), encoder.tokenizer.pad_token_id
    with (base or nullcontext)() as other:  # a context may yield another model to score (a separate base copy)
        before = preference_scores(other if other is not None else model, pairs, pad, batch_size)
    after = preference_scores(model, pairs, pad, batch_size)
    n = len(after["better"])
    if not n:
        raise ValueError("no held-out pair to score (KTO: no prompt with both a desirable and an undesirable answer)")
    hits = {side: [b > w for b, w in zip(s["better"], s["worse"])] for side, s in (("base", before), ("tuned", after))}
    report: dict[str, Any] = {"n": n}
    for side, h in hits.items():
        k = sum(h)
        report[side] = {"preference_accuracy": k / n, "ci95": list(wilson_interval(k, n))}
    low, high = paired_bootstrap(hits["base"], hits["tuned"])
    report["difference"] = {"preference_accuracy": report["tuned"]["preference_accuracy"]
                            - report["base"]["preference_accuracy"], "ci95": [low, high]}
    margins = [beta * ((tb - bb) - (tw - bw)) for tb, tw, bb, bw in
               zip(after["better"], after["worse"], before["better"], before["worse"])]
    report["reward_margin"] = {"mean": sum(margins) / n, "beta": beta}
    return report


def format_preference_table(report: dict[str, Any]) -> str:
    def cell(side: dict) -> str:
        return f"{side['preference_accuracy']:.1%} [{side['ci95'][0]:.1%}, {side['ci95'][1]:.1%}]"

    b, t, d = report["base"], report["tuned"], report["difference"]
    width = max(len(cell(b)), len(cell(t)), 5)
    return "\n".join([
        f"| {'':19} | {'base':>{width}} | {'tuned':>{width}} |",
        f"|{'-' * 21}|{'-' * (width + 2)}|{'-' * (width + 2)}|",
        f"| {'preference accuracy':19} | {cell(b):>{width}} | {cell(t):>{width}} |",
        f"tuned - base: {d['preference_accuracy']:+.1%}, 95% CI [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}] (paired "
        f"bootstrap, {report['n']} pairs); mean reward margin vs the base: {report['reward_margin']['mean']:+.4f} "
        f"(beta {report['reward_margin']['beta']:g})",
    ])

"""Leak check: held-out examples that also occur in the training data make an eval score a memory test.

Each eval example is compared with the training examples three ways, strictest first: the whole
conversation verbatim; the whole conversation after normalising case and spaces; the prompt alone
(same question, possibly a different answer). Counts are cumulative (an exact copy also counts as a
normalised one); each leaked example is named once, by file:line, with its strictest match.
"""

from __future__ import annotations

from typing import Any, Iterable

from .data.records import Example
from .metrics import normalize_spaces

KINDS = ("exact", "normalized", "prompt")


def _conversation(messages: Iterable[dict], norm=lambda t: t) -> tuple:
    return tuple((m["role"], norm(m["content"])) for m in messages)


_KEYS = {"exact": lambda ex: _conversation(ex.messages),
         "normalized": lambda ex: _conversation(ex.messages, normalize_spaces),
         "prompt": lambda ex: _conversation(ex.prompt_messages, normalize_spaces)}


def find_leaks(eval_examples: list[Example], train_examples: list[Example], max_listed: int = 20) -> dict[str, Any]:
    indexes: dict[str, dict[tuple, str]] = {kind: {} for kind in KINDS}
    for ex in train_examples:
        for kind in KINDS:
            indexes[kind].setdefault(_KEYS[kind](ex), ex.source)
    n = len(eval_examples)
    report: dict[str, Any] = {"eval_examples": n, "train_examples": len(train_examples)}
    counts = dict.fromkeys(KINDS, 0)
    leaked = []
    for ex in eval_examples:
        found = [(kind, indexes[kind].get(_KEYS[kind](ex))) for kind in KINDS]
        found = [(kind, src) for kind, src in found if src is not None]
        for kind, _ in found:
            counts[kind] += 1
        if found:
            leaked.append({"eval": ex.source, "train": found[0][1], "match": found[0][0]})
    for kind in KINDS:
        report[kind] = {"count": counts[kind], "share": counts[kind] / max(n, 1)}
    report["leaked"] = len(leaked)
    report["listed"] = leaked[:max_listed]
    return report


def format_leaks(leaks: dict[str, Any]) -> str:
    n = leaks["eval_examples"]
    parts = [f"{leaks[k]['count']}/{n} {label}" for k, label in
             (("exact", "exact"), ("normalized", "after normalising case/spaces"), ("prompt", "same prompt"))]
    line = "leak check: " + ", ".join(parts) + " also in the training data"
    if leaks["listed"]:
        line += " (e.g. " + ", ".join(f"{h['eval']} = {h['train']}" for h in leaks["listed"][:3]) + ")"
    return line

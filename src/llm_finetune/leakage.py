"""Leak check: held-out examples that also occur in the training data make an eval score a memory test.

Each eval example is compared with every training example three ways: the whole conversation
verbatim, the whole conversation after normalising case and spaces, and the prompt alone
(same question, possibly a different answer). Matches are counted and named by file:line.
"""

from __future__ import annotations

from typing import Any, Iterable

from .data.records import Example
from .metrics import normalize_spaces


def _conversation(messages: Iterable[dict], norm) -> tuple:
    return tuple((m["role"], norm(m["content"])) for m in messages)


def _exact(text: str) -> str:
    return text


def find_leaks(eval_examples: list[Example], train_examples: list[Example], max_listed: int = 20) -> dict[str, Any]:
    keys = {"exact": lambda ex: _conversation(ex.messages, _exact),
            "normalized": lambda ex: _conversation(ex.messages, normalize_spaces),
            "prompt": lambda ex: _conversation(ex.prompt_messages, normalize_spaces)}
    report: dict[str, Any] = {"eval_examples": len(eval_examples), "train_examples": len(train_examples)}
    for kind, key in keys.items():
        index: dict[tuple, str] = {}
        for ex in train_examples:
            index.setdefault(key(ex), ex.source)
        hits = [{"eval": ex.source, "train": index[k]} for ex in eval_examples if (k := key(ex)) in index]
        report[kind] = {"count": len(hits), "share": len(hits) / max(len(eval_examples), 1),
                        "examples": hits[:max_listed]}
    return report


def format_leaks(leaks: dict[str, Any]) -> str:
    n = leaks["eval_examples"]
    parts = [f"{leaks[k]['count']}/{n} {label}" for k, label in
             (("exact", "exact"), ("normalized", "after normalising case/spaces"), ("prompt", "same prompt"))]
    line = "leak check: " + ", ".join(parts) + " also in the training data"
    named = leaks["normalized"]["examples"] or leaks["prompt"]["examples"]
    if named:
        line += " (e.g. " + ", ".join(f"{h['eval']} = {h['train']}" for h in named[:3]) + ")"
    return line

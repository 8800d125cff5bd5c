"""Leak check: held-out examples that also occur in the training data make an eval score a memory test.

Each eval example is compared with the examples the run actually trained on (after the eval split,
weighting, de-duplication and dropping rows too long: `TrainIndex`, built by the data step) three
ways, strictest first: the whole conversation verbatim; the whole conversation after normalising case
and spaces; the prompt alone (same question, possibly a different answer). Plain text rows have no
prompt, so they never match on the prompt. Counts are cumulative (an exact copy also counts as a
normalised one); each leaked example is named once, by file:line, with its strictest match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..data.records import Example
from .metrics import normalize_spaces

KINDS = ("exact", "normalized", "prompt")


def _digest(parts: Any) -> bytes:
    """8 bytes per key: the index holds hashes, not texts, so it stays small next to a large train set."""
    text = json.dumps(parts, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def _conversation(messages: Iterable[dict], norm: Callable[[str], str] = lambda t: t) -> list:
    return [(m["role"], norm(m["content"])) for m in messages]


def _key(kind: str, ex: Example) -> bytes | None:
    """The example's key for one kind of match; None where the kind does not apply (a text row's prompt)."""
    if kind == "exact":
        return _digest(_conversation(ex.messages))
    if kind == "normalized":
        return _digest(_conversation(ex.messages, normalize_spaces))
    if ex.format == "text" or not ex.prompt_messages:
        return None
    return _digest(_conversation(ex.prompt_messages, normalize_spaces))


@dataclass
class TrainIndex:
    """The keys of the trained examples, each pointing at the first training row (file:line) that has it."""

    keys: dict[str, dict[bytes, str]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    examples: int = 0

    @classmethod
    def build(cls, examples: Iterable[Example]) -> "TrainIndex":
        index = cls()
        for ex in examples:
            index.examples += 1
            for kind in KINDS:
                key = _key(kind, ex)
                if key is not None:
                    index.keys[kind].setdefault(key, ex.source)
        return index

    def match(self, kind: str, ex: Example) -> str | None:
        key = _key(kind, ex)
        return None if key is None else self.keys[kind].get(key)


def find_leaks(eval_examples: list[Example], train: TrainIndex | list[Example], max_listed: int = 20
               ) -> dict[str, Any]:
    """Count and name the eval examples found in `train` (an index, or the trained examples themselves)."""
    index = train if isinstance(train, TrainIndex) else TrainIndex.build(train)
    n = len(eval_examples)
    report: dict[str, Any] = {"eval_examples": n, "train_examples": index.examples}
    counts = dict.fromkeys(KINDS, 0)
    leaked = []
    for ex in eval_examples:
        found = [(kind, index.match(kind, ex)) for kind in KINDS]
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
    line = "leak check: " + ", ".join(parts) + f" also among the {leaks['train_examples']} trained examples"
    if leaks["listed"]:
        line += " (e.g. " + ", ".join(f"{h['eval']} = {h['train']}" for h in leaks["listed"][:3]) + ")"
    if leaks.get("note"):
        line += f"; note: {leaks['note']}"
    return line

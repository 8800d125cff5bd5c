#!/usr/bin/env python3
"""Generate the shipped preference demo: the extraction task of the SFT demo, as pairs.

Each row is alpaca-style::

    {"instruction": "... Answer with JSON only ...", "input": "<sentence>", "chosen": "{\"name\": ..., ...}",
     "rejected": "<the same facts, not as the JSON object asked for>"}

The instruction asks for a single JSON object and nothing else; the chosen answer is exactly that (the SFT
demo's output). The rejected answer states the same facts in a form the instruction forbids, the forms a
small chat model tends to produce instead: a sentence, "key: value" lines, or the JSON in a markdown fence
after a friendly preamble. So the pair teaches the format, not the facts.

Built from data/train.jsonl and data/eval.jsonl (whose names, ages, cities and phrasings are disjoint), so the
held-out pairs share nothing with the training pairs but the instructions. Deterministic (stdlib only)::

    python data/make_preference_data.py

writes data/preference_train.jsonl (400 pairs) and data/preference_eval.jsonl (120 pairs).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rejected(facts: dict, i: int) -> str:
    name, age, city = facts["name"], facts["age"], facts["city"]
    styles = [
        f"{name} is {age} years old and lives in {city}.",
        f"Name: {name}\nAge: {age}\nCity: {city}",
        f"Sure! Here is the information:\n```json\n{json.dumps(facts, ensure_ascii=False)}\n```",
    ]
    return styles[i % len(styles)]


def pairs(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        facts = json.loads(row["output"])
        out.append({"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
                    "rejected": rejected(facts, i)})
    return out


def main() -> None:
    for split in ("train", "eval"):
        rows = pairs(HERE / f"{split}.jsonl")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (HERE / f"preference_{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"data/preference_{split}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()

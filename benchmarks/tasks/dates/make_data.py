#!/usr/bin/env python3
"""Generate the `dates` benchmark task: a date written many ways -> ISO ``YYYY-MM-DD``.

Each row is an alpaca-format record::

    {"instruction": "...", "input": "<one sentence mentioning one date>", "output": "2014-03-05"}

The sentence mentions exactly one calendar date, written in one of several styles ("March 5, 2014",
"2014/03/05", "the 5th of March, 2014", ...), sometimes next to a distracting number (an order or
room number) that must not be used. The output is exactly ``datetime.date.isoformat()``.

Train and eval differ in distribution, so a model that memorises training answers or their form
scores low:

* years are disjoint (eval uses years with ``year % 5 == 2``, train every other year of 1901-2099),
  so no eval answer is ever a training answer;
* (month, day) combinations are disjoint (train: ``month + day`` even, eval: odd), while every month
  and every day number occurs in both splits;
* the date styles and the sentence templates of eval are never seen in training ("5-Mar-2014",
  "Wednesday, 5 March 2014", "MAR 05 2014", ... only in eval).

The script asserts all of this itself.

Usage (stdlib only, deterministic)::

    python benchmarks/tasks/dates/make_data.py

writes ``train.jsonl`` and ``eval.jsonl`` next to this script; re-running reproduces both files
byte-identically.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from pathlib import Path
from typing import Callable

SEED = 20241105
N_TRAIN = 300
N_EVAL = 100
YEAR_MIN, YEAR_MAX = 1901, 2099

OUT_DIR = Path(__file__).resolve().parent

# The same instruction paraphrases are used for both splits.
INSTRUCTIONS = [
    "Rewrite the date mentioned in the text in ISO format (YYYY-MM-DD). Answer with the date only.",
    "Which date does this sentence mention? Reply with YYYY-MM-DD and nothing else.",
    "Normalise the date in the text to the form YYYY-MM-DD. Output only the date.",
]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def abbrev(d: dt.date) -> str:
    return MONTHS[d.month - 1][:3]


# ---------------------------------------------------------------- styles ----
# How the date itself is written. Every style is unambiguous (month names, or year first).
Style = Callable[[dt.date], str]
TRAIN_STYLES: dict[str, Style] = {
    "Month D, YYYY": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "D Month YYYY": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "Mon D, YYYY": lambda d: f"{abbrev(d)} {d.day}, {d.year}",
    "YYYY/MM/DD": lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    "the Dth of Month, YYYY": lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "Month Dth, YYYY": lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",
}
EVAL_STYLES: dict[str, Style] = {
    "D-Mon-YYYY": lambda d: f"{d.day}-{abbrev(d)}-{d.year}",
    "Weekday, D Month YYYY": lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
    "YYYY.MM.DD": lambda d: f"{d.year}.{d.month:02d}.{d.day:02d}",
    "MON DD YYYY": lambda d: f"{abbrev(d).upper()} {d.day:02d} {d.year}",
    "Dth Month YYYY": lambda d: f"{ordinal(d.day)} {MONTHS[d.month - 1]} {d.year}",
}

# ------------------------------------------------------------ templates ----
# Placeholders: {date} and {n} (a distracting number that must not be used).
TRAIN_TEMPLATES = [
    "The invoice is dated {date}.",
    "She was born on {date}.",
    "We signed the lease on {date}.",
    "Order {n} was shipped on {date}.",
    "The museum reopened on {date} after repairs.",
    "Deadline for applications: {date}.",
    "The letter from room {n} was posted on {date}.",
    "{date} is when the new library opened.",
]
EVAL_TEMPLATES = [
    "According to the record, the ceremony took place on {date}.",
    "Our flight {n} leaves on {date}, early in the morning.",
    "Date of issue - {date}",
    "He retired on {date} after {n} days of notice.",
    "The bridge was opened to traffic on {date}.",
    "Minutes of the meeting held {date}.",
]

# Years and (month, day) combinations: disjoint between the splits.
TRAIN_YEARS = [y for y in range(YEAR_MIN, YEAR_MAX + 1) if y % 5 != 2]
EVAL_YEARS = [y for y in range(YEAR_MIN, YEAR_MAX + 1) if y % 5 == 2]


def train_month_day(month: int, day: int) -> bool:
    return (month + day) % 2 == 0


def random_date(rng: random.Random, years: list[int], for_train: bool) -> dt.date:
    """A uniformly drawn valid date of the split's years whose (month, day) belongs to the split."""
    while True:
        year = rng.choice(years)
        day_of_year = rng.randrange(366 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 365)
        date = dt.date(year, 1, 1) + dt.timedelta(days=day_of_year)
        if train_month_day(date.month, date.day) == for_train:
            return date


def make_rows(rng: random.Random, n: int, years: list[int], styles: dict[str, Style], templates: list[str],
              for_train: bool) -> list[tuple[dict, str, str]]:
    rows, seen = [], set()
    while len(rows) < n:
        date = random_date(rng, years, for_train)
        style = rng.choice(sorted(styles))
        template = rng.choice(templates)
        text = template.format(date=styles[style](date), n=rng.randint(12, 980))
        if text in seen:
            continue
        seen.add(text)
        rows.append(({"instruction": rng.choice(INSTRUCTIONS), "input": text, "output": date.isoformat()},
                     style, template))
    return rows


def check_disjoint(train_rows, eval_rows) -> None:
    def disjoint(a, b, what):
        common = set(a) & set(b)
        assert not common, f"{what} overlap between train and eval: {sorted(common)}"

    disjoint(TRAIN_YEARS, EVAL_YEARS, "years")
    disjoint(TRAIN_STYLES, EVAL_STYLES, "style names")
    disjoint(TRAIN_TEMPLATES, EVAL_TEMPLATES, "templates")
    # The styles differ in shape, not only in name: one date rendered every way gives distinct strings.
    probe = dt.date(2003, 11, 4)
    disjoint([f(probe) for f in TRAIN_STYLES.values()], [f(probe) for f in EVAL_STYLES.values()], "style shapes")
    for pool in (TRAIN_TEMPLATES, EVAL_TEMPLATES):
        assert len(pool) == len(set(pool)), "duplicate entry in a pool"

    def used(rows):
        dates = [dt.date.fromisoformat(r["output"]) for r, _, _ in rows]
        return ({d.year for d in dates}, {(d.month, d.day) for d in dates}, {r["output"] for r, _, _ in rows},
                {s for _, s, _ in rows}, {t for _, _, t in rows})

    ty, tmd, tout, ts, tt = used(train_rows)
    ey, emd, eout, es, et = used(eval_rows)
    for a, b, what in ((ty, ey, "used years"), (tmd, emd, "used (month, day) combinations"),
                       (tout, eout, "answers"), (ts, es, "used styles"), (tt, et, "used templates")):
        disjoint(a, b, what)
    # Every month and every day number is still taught: only their combinations are held out.
    assert {m for m, _ in tmd} == set(range(1, 13)) and {d for _, d in tmd} == set(range(1, 32)), \
        "a month or day number never occurs in training"

    train_pairs = {(r["instruction"], r["input"]) for r, _, _ in train_rows}
    for r, _, _ in eval_rows:
        assert (r["instruction"], r["input"]) not in train_pairs, "eval pair in train"
    # A model that answers any one constant (or any one year, month or day) gets few eval rows right.
    for what, values in (("answer", [r["output"] for r, _, _ in eval_rows]),
                         ("year", [r["output"][:4] for r, _, _ in eval_rows]),
                         ("month", [r["output"][5:7] for r, _, _ in eval_rows]),
                         ("day", [r["output"][8:] for r, _, _ in eval_rows])):
        top, count = Counter(values).most_common(1)[0]
        assert count <= 0.2 * len(eval_rows), f"eval {what} {top!r} in {count} of {len(eval_rows)} rows"


def check_answers(rows) -> None:
    """Each output is the ISO form of the one date its input mentions (rendered back and found)."""
    for r, style, _ in rows:
        date = dt.date.fromisoformat(r["output"])
        styles = TRAIN_STYLES if style in TRAIN_STYLES else EVAL_STYLES
        assert styles[style](date) in r["input"], (r, style)
        assert len(r["output"]) == 10 and r["output"] == date.isoformat()


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r, _, _ in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    train_rows = make_rows(rng, N_TRAIN, TRAIN_YEARS, TRAIN_STYLES, TRAIN_TEMPLATES, for_train=True)
    eval_rows = make_rows(rng, N_EVAL, EVAL_YEARS, EVAL_STYLES, EVAL_TEMPLATES, for_train=False)
    check_disjoint(train_rows, eval_rows)
    check_answers(train_rows + eval_rows)
    write_jsonl(OUT_DIR / "train.jsonl", train_rows)
    write_jsonl(OUT_DIR / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train rows -> {OUT_DIR / 'train.jsonl'}")
    print(f"wrote {len(eval_rows)} eval rows -> {OUT_DIR / 'eval.jsonl'}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generate the `topics` benchmark task: the topic label of a one-sentence news item.

Each row is an alpaca-format record::

    {"instruction": "...", "input": "<one news sentence>", "output": "sports"}

The label is one of ``sports``, ``business``, ``science``, ``health``; the instruction names all four.

Train and eval differ in distribution, so a model that keys on training words or answers a constant
scores low:

* the sentence templates of eval are never seen in training, and every slot filler (teams, sports,
  companies, products, universities, species, diseases, habits, hospitals, people) comes from pools
  disjoint between the splits, checked in both directions as substrings of the other split's inputs;
  eval is solvable only with what the model knows about the words, not with training's keywords;
* both splits are exactly balanced (a quarter per label) and shuffled, so always answering one label
  scores 25%.

The script asserts all of this itself.

Usage (stdlib only, deterministic)::

    python benchmarks/tasks/topics/make_data.py

writes ``train.jsonl`` and ``eval.jsonl`` next to this script; re-running reproduces both files
byte-identically.
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from pathlib import Path

SEED = 20241106
N_TRAIN = 300
N_EVAL = 100
LABELS = ["sports", "business", "science", "health"]

OUT_DIR = Path(__file__).resolve().parent

# The same instruction paraphrases are used for both splits.
INSTRUCTIONS = [
    "Classify the topic of the sentence as sports, business, science or health. Answer with the label only.",
    "Which topic is this sentence about: sports, business, science or health? Reply with one word.",
    "Label the text with its topic (sports, business, science or health). Output only the label.",
]

# ------------------------------------------------------------ templates ----
# Per label and split. Placeholders name a slot pool below; {a} and {b} are small numbers.
TRAIN_TEMPLATES = {
    "sports": [
        "{team} beat {team2} {a}-{b} in last night's {sport} match.",
        "The {sport} player {person} signed a three-year contract with {team}.",
        "{team} fired their coach after {a} straight defeats.",
        "Thousands of fans cheered as {team} lifted the {sport} cup.",
        "{person} scored twice to send {team} into the {sport} semi-finals.",
    ],
    "business": [
        "{company} shares rose {a} percent after strong quarterly earnings.",
        "{company} agreed to buy {company2} for {a} million dollars.",
        "{company} will cut {a} hundred jobs to reduce costs.",
        "The chief executive of {company}, {person}, resigned after a drop in sales.",
        "{company} reported record profits from its {product} division.",
    ],
    "science": [
        "Astronomers at {institute} discovered a new {body} orbiting a distant star.",
        "Physicists at {institute} measured the {quantity} with record precision.",
        "Biologists led by {person} found a new species of {organism} in a remote valley.",
        "Chemists led by {person} made a material that conducts electricity at room temperature.",
        "A probe built by {institute} sent back its first images of a {body} after {a} years.",
    ],
    "health": [
        "Doctors warn that {habit} raises the risk of {disease}.",
        "A new vaccine against {disease} entered clinical trials at {hospital}.",
        "{hospital} opened a clinic for patients with {disease}.",
        "A study of {a} thousand adults linked {habit} to poor sleep.",
        "Dr {person} urged people with {disease} to keep taking their medication.",
    ],
}
EVAL_TEMPLATES = {
    "sports": [
        "{person} set a new {sport} world record at the championships.",
        "The {sport} final went to extra time before {team} scored the winner.",
        "{team} were relegated after losing {a} of their last {b} {sport} games.",
        "Rain stopped play in the {sport} game, with {team} leading {team2}.",
    ],
    "business": [
        "Investors sold {company} stock as revenue fell for the {b}th month in a row.",
        "Regulators approved the merger of {company} and {company2}.",
        "{company} raised its annual forecast on demand for {product}.",
        "The board of {company} announced a dividend of {a} cents per share.",
    ],
    "science": [
        "A telescope recorded two {body} colliding billions of light years away.",
        "Researchers at {institute} sequenced the genome of the {organism}.",
        "{person} and colleagues observed the {quantity} decaying in a new way.",
        "Geologists from {institute} found {b} crystals that formed four billion years ago.",
    ],
    "health": [
        "Nurses at {hospital} reported a rise in {disease} cases this winter.",
        "Cutting down on {habit} lowered blood pressure in a trial of {a} hundred patients.",
        "Dr {person} says early screening halves deaths from {disease}.",
        "{hospital} linked a surge in admissions to {habit}.",
    ],
}

# ---------------------------------------------------------------- pools ----
TRAIN_POOLS = {
    "team": ["Riverside United", "Northfield Rovers", "Eastport Athletic", "Lakeside City", "Hillcrest Town",
             "Bayview Rangers"],
    "sport": ["football", "basketball", "rugby", "ice hockey", "tennis"],
    "company": ["Alder Foods", "Brightwave Telecom", "Corvin Motors", "Dunmore Bank", "Elstree Retail",
                "Fairhaven Airlines"],
    "product": ["cloud software", "frozen pizza", "electric van", "credit card"],
    "institute": ["Northgate University", "the Ardley Institute", "Pembrook College", "the Tallis Observatory"],
    "body": ["planet", "moon", "dwarf planet", "gas giant"],
    "quantity": ["electron's charge", "speed of sound in ice", "proton radius", "Higgs boson"],
    "organism": ["tree frog", "beetle", "orchid", "bat"],
    "disease": ["diabetes", "asthma", "measles", "heart disease", "migraine"],
    "habit": ["smoking", "skipping breakfast", "drinking sugary sodas", "late-night screen use"],
    "hospital": ["St Anne's Hospital", "Greenway Medical Centre", "the Royal Infirmary of Dunmere"],
    "person": ["Maria Santos", "Henrik Dahl", "Kenji Watanabe", "Amara Okafor", "Liam Novak", "Sofia Rossi",
               "Rahul Sharma", "Olga Petrov", "Diego Costa-Lima", "Elif Yilmaz"],
}
EVAL_POOLS = {
    "team": ["Harbour Wanderers", "Westbrook Albion", "Stonebridge Hornets", "Millfield Eagles",
             "Redcliffe Giants"],
    "sport": ["cricket", "baseball", "volleyball", "handball", "water polo"],
    "company": ["Glenrock Insurance", "Hollis Steel", "Juniper Logistics", "Kestrel Energy",
                "Larchmont Textiles"],
    "product": ["smartphones", "office furniture", "solar panels", "budget flights"],
    "institute": ["Westmoor University", "the Calder Laboratory", "Ravensworth Polytechnic"],
    "body": ["galaxies", "black holes", "neutron stars", "white dwarfs"],
    "quantity": ["muon", "neutrino", "top quark"],
    "organism": ["lungfish", "axolotl", "giant squid", "tardigrade"],
    "disease": ["malaria", "tuberculosis", "arthritis", "hepatitis", "influenza"],
    "habit": ["vaping", "salty snacks", "energy drinks", "alcohol"],
    "hospital": ["Mercy General", "the Lindqvist Clinic", "Ashford Children's Hospital"],
    "person": ["Beatriz Pereira", "Orhan Aksoy", "Keiko Hayashi", "Adaeze Eze", "Viktor Volkov", "Tobias Weber",
               "Imran Qureshi", "Ewa Nowak", "Kofi Asante"],
}
# {team2} and {company2}: a second, different value of the same pool.
SECOND = {"team2": "team", "company2": "company"}


def fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(rng: random.Random, template: str, pools: dict[str, list[str]]) -> str:
    values: dict[str, str | int] = {"a": rng.randint(2, 9), "b": rng.randint(10, 19)}
    for name in fields(template):
        if name in values:
            continue
        pool = pools[SECOND.get(name, name)]
        taken = {values.get(SECOND.get(name, name)), values.get(name)}
        values[name] = rng.choice([v for v in pool if v not in taken])
    text = template.format(**values)
    return text[0].upper() + text[1:]  # "the Ardley Institute ..." starts a sentence


def make_rows(rng: random.Random, n: int, templates: dict[str, list[str]],
              pools: dict[str, list[str]]) -> list[tuple[dict, str]]:
    """Exactly n / 4 rows per label, shuffled; no input repeats."""
    assert n % len(LABELS) == 0, "n must split evenly over the labels"
    rows, seen = [], set()
    for label in LABELS:
        count = attempts = 0
        while count < n // len(LABELS):
            attempts += 1
            assert attempts < 100 * n, f"{label!r}: too few distinct sentences; add templates or pool values"
            template = rng.choice(templates[label])
            text = fill(rng, template, pools)
            if text in seen:
                continue
            seen.add(text)
            rows.append(({"instruction": rng.choice(INSTRUCTIONS), "input": text, "output": label}, template))
            count += 1
    rng.shuffle(rows)
    return rows


def check_disjoint(train_rows, eval_rows) -> None:
    def disjoint(a, b, what):
        common = set(a) & set(b)
        assert not common, f"{what} overlap between train and eval: {sorted(common)}"

    all_train_templates = [t for ts in TRAIN_TEMPLATES.values() for t in ts]
    all_eval_templates = [t for ts in EVAL_TEMPLATES.values() for t in ts]
    disjoint(all_train_templates, all_eval_templates, "templates")
    disjoint({t for _, t in train_rows}, {t for _, t in eval_rows}, "used templates")
    for pool in (all_train_templates, all_eval_templates, *TRAIN_POOLS.values(), *EVAL_POOLS.values()):
        assert len(pool) == len(set(pool)), "duplicate entry in a pool"
    train_values = {v for pool in TRAIN_POOLS.values() for v in pool}
    eval_values = {v for pool in EVAL_POOLS.values() for v in pool}
    disjoint(train_values, eval_values, "slot values")
    # No slot value of one split occurs, even as a substring (any case), in the other split's inputs.
    train_text = "\n".join(r["input"] for r, _ in train_rows).lower()
    eval_text = "\n".join(r["input"] for r, _ in eval_rows).lower()
    for value in sorted(eval_values):
        assert value.lower() not in train_text, f"eval value {value!r} occurs in a train input"
    for value in sorted(train_values):
        assert value.lower() not in eval_text, f"train value {value!r} occurs in an eval input"
    train_pairs = {(r["instruction"], r["input"]) for r, _ in train_rows}
    for r, _ in eval_rows:
        assert (r["instruction"], r["input"]) not in train_pairs, "eval pair in train"


def check_balance(rows, split: str) -> None:
    """Every label a quarter of the split: no constant answer scores above 25%."""
    counts = Counter(r["output"] for r, _ in rows)
    assert set(counts) == set(LABELS) and len(set(counts.values())) == 1, f"{split} labels unbalanced: {counts}"
    for label in LABELS:  # the order is mixed, not four blocks
        first = [i for i, (r, _) in enumerate(rows) if r["output"] == label][0]
        assert first < len(rows) // 4, f"{split}: first {label!r} row only at position {first}"


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r, _ in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    train_rows = make_rows(rng, N_TRAIN, TRAIN_TEMPLATES, TRAIN_POOLS)
    eval_rows = make_rows(rng, N_EVAL, EVAL_TEMPLATES, EVAL_POOLS)
    check_disjoint(train_rows, eval_rows)
    check_balance(train_rows, "train")
    check_balance(eval_rows, "eval")
    for r, _ in train_rows + eval_rows:
        assert r["output"] in LABELS and "{" not in r["input"], r
    write_jsonl(OUT_DIR / "train.jsonl", train_rows)
    write_jsonl(OUT_DIR / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train rows -> {OUT_DIR / 'train.jsonl'}")
    print(f"wrote {len(eval_rows)} eval rows -> {OUT_DIR / 'eval.jsonl'}")


if __name__ == "__main__":
    main()

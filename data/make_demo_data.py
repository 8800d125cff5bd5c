#!/usr/bin/env python3
"""Generate the shipped demo task: information extraction into strict JSON.

Each row is an alpaca-format record::

    {"instruction": "...", "input": "<one English sentence>", "output": "{\"name\": ..., \"age\": ..., \"city\": ...}"}

The input sentence mentions a person's full name, age and city of residence,
sometimes with distractors (a profession, a year, a small count) that must
NOT be extracted.  The output is exactly
``json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)``.

Train and eval are built from disjoint pools of first names, last names,
cities, ages and sentence templates, so no eval value or phrasing is ever
seen in training.  The script asserts this itself.

Usage (stdlib only, deterministic)::

    python data/make_demo_data.py

writes ``data/train.jsonl`` and ``data/eval.jsonl`` next to this script;
re-running reproduces both files byte-identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
N_TRAIN = 400
N_EVAL = 120
AGE_MIN, AGE_MAX = 18, 90

OUT_DIR = Path(__file__).resolve().parent

# The same instruction paraphrases are used for both splits.
INSTRUCTIONS = [
    'Extract the person\'s name, age and city from the text. '
    'Answer with JSON only: {"name": ..., "age": ..., "city": ...}',
    'Read the sentence and return the person\'s full name, age and city of '
    'residence as JSON only, using the keys "name", "age" and "city".',
    'From the text below, extract name, age (as a number) and city. '
    'Reply with a single JSON object and nothing else.',
]

# ---------------------------------------------------------------- pools ----
TRAIN_FIRST = [
    "Maria", "Henrik", "Kenji", "José", "Zoë", "Amara", "Liam", "Sofia",
    "Mateo", "Aisha", "Lukas", "Ingrid", "Rahul", "Mei", "Olga", "Tomasz",
    "Chiara", "Diego", "Fatima", "Noah", "Elif", "Kwame", "Hana", "Pablo",
    "Anika", "Dmitri", "Leila", "Oscar", "Priya", "Jonas", "Camila", "Yusuf",
    "Nadia", "Emil", "Thandiwe", "Marco", "Sven", "Aiko", "Rafael", "Inês",
    "Björn", "Chloé", "Andrzej", "Lucía", "Tariq", "Freya", "Hugo", "Amelia",
    "Omar", "Kasia", "Nikolai", "Carmen", "Arjun", "Yuki", "Gabriel", "Astrid",
    "Wei", "Ngozi", "Matteo", "Siobhan", "Jean-Luc", "Ana", "Farid", "Greta",
]
TRAIN_LAST = [
    "Santos", "Dahl", "Watanabe", "García", "Okafor", "Müller", "Novak",
    "Rossi", "Kowalski", "Haddad", "Lindqvist", "Sharma", "Nakamura", "Petrov",
    "Fernández", "Mensah", "Yilmaz", "O'Brien", "Jensen", "Costa", "Dubois",
    "Schmidt", "Tanaka", "Ivanova", "Moreau", "Adeyemi", "Larsen", "Bianchi",
    "Kim", "Nguyen", "Papadopoulos", "Horváth", "Silva", "Andersson",
    "Chowdhury", "Kaya", "Hoffmann", "Mendoza", "Eriksen", "Zhang", "Popescu",
    "Nieminen", "Ortiz", "Kovač", "Bergström", "Lefèvre", "Mwangi", "Suzuki",
    "Herrera", "Wójcik", "Castillo", "Fischer", "Singh", "Abe", "van Dijk",
    "Morales", "Hansen", "Sato", "Ali", "Romano", "Delgado", "Kuznetsov",
    "López-Vega", "Schultz", "Farouk", "Brennan",
]
TRAIN_CITIES = [
    "Lisbon", "Oslo", "Osaka", "Saint-Étienne", "Berlin", "Madrid", "Nairobi",
    "Kraków", "Toronto", "Seoul", "Lagos", "Hamburg", "Porto", "Bergen",
    "Kyoto", "Marseille", "Valencia", "Accra", "Istanbul", "Mumbai",
    "Melbourne", "Vancouver", "Montréal", "Zürich", "Vienna", "Prague",
    "Budapest", "Warsaw", "Helsinki", "Stockholm", "Copenhagen", "Dublin",
    "Edinburgh", "Manchester", "Lyon", "Milan", "Naples", "Seville", "Bilbao",
    "Rotterdam", "Antwerp", "Gdańsk", "Bogotá", "Lima", "Santiago", "Córdoba",
    "Cape Town", "Cairo", "Casablanca", "Hanoi", "Bangkok", "Manila",
    "Auckland", "Chicago", "Boston", "Denver", "Gothenburg",
]

EVAL_FIRST = [
    "Beatriz", "Orhan", "Keiko", "Lars", "Adaeze", "François", "Marta",
    "Viktor", "Soraya", "Tobias", "Ayumi", "Rodrigo", "Helga", "Imran",
    "Noémie", "Stefan", "Lina", "Javier", "Ewa", "Kofi", "Renata", "Hiroshi",
    "Malik", "Annika", "Dario", "Yasmin", "Piotr", "Mariam", "Raúl", "Sanne",
    "Chen", "Anneliese", "Idris", "Jun",
]
EVAL_LAST = [
    "Pereira", "Aksoy", "Hayashi", "Nilsson", "Eze", "Girard", "Ruiz",
    "Volkov", "Rahimi", "Weber", "Mori", "Carvalho", "Sørensen", "Qureshi",
    "Laurent", "Bauer", "Park", "Navarro", "Nowak", "Asante", "Conti",
    "Yamamoto", "Hussein", "Virtanen", "Greco", "Salazar", "Lewandowski",
    "Karimi", "Jovanović", "Lam", "Byrne", "Martín-Soto", "Ibáñez",
]
EVAL_CITIES = [
    "Turin", "Malmö", "Nagoya", "Rennes", "Leipzig", "Granada", "Mombasa",
    "Wrocław", "Ottawa", "Busan", "Ibadan", "Bremen", "Coimbra", "Trondheim",
    "Sapporo", "Toulouse", "Zaragoza", "Kumasi", "Izmir", "Pune", "Brisbane",
    "Calgary", "Québec City", "Basel", "Graz", "Brno", "Tampere", "Aarhus",
    "Cork", "Glasgow", "Bordeaux", "Bologna", "São Paulo",
]

# Distractors (never extracted), shared by both splits.
JOBS = [
    "baker", "nurse", "architect", "teacher", "engineer", "pharmacist",
    "carpenter", "journalist", "translator", "electrician", "librarian",
    "chef", "photographer", "accountant", "veterinarian", "pilot",
    "graphic designer", "software developer", "dentist", "florist",
]
YEARS = list(range(1995, 2024))

# Ages: train uses ages with age % 3 != 0, eval uses ages with age % 3 == 0.
TRAIN_AGES = [a for a in range(AGE_MIN, AGE_MAX + 1) if a % 3 != 0]
EVAL_AGES = [a for a in range(AGE_MIN, AGE_MAX + 1) if a % 3 == 0]

# ------------------------------------------------------------ templates ----
# Placeholders: {name} {age} {city} {a_job} (job with article) {job} {year} {n}
TRAIN_TEMPLATES = [
    "{name}, {age}, lives in {city}.",
    "Living in {city}, {age}-year-old {name} works as {a_job}.",
    "At {age}, {name} moved to {city} for work.",
    "{name} is {age} years old and lives in {city}.",
    "{name} ({age}) has lived in {city} since {year}.",
    "The {job} {name}, aged {age}, is based in {city}.",
    "{name} turned {age} last month and still lives in {city}.",
    "Our new neighbour in {city} is {name}, who is {age}.",
    "{name}, {a_job} aged {age}, calls {city} home.",
    "Since {year}, {age}-year-old {name} has worked as {a_job} in {city}.",
    "Meet {name}: {age} years old, living in {city}.",
    "{name} lives in {city} with {n} cats and is {age}.",
    "Resident of {city} {name}, {age}, works as {a_job}.",
    "{name} works as {a_job} in {city} at the age of {age}.",
]
EVAL_TEMPLATES = [
    "According to the registry, {name} is {age} and resides in {city}.",
    "{city} is where {name}, now {age}, has made a home since {year}.",
    "Aged {age}, {name} currently lives and works in {city}.",
    "Having recently turned {age}, {name} settled down in {city}.",
    "After {n} years abroad, {name} (age {age}) relocated to {city}.",
    "Name: {name}; age: {age}; current city: {city}; occupation: {job}.",
    "{name}, who is {age}, commutes daily around {city} as {a_job}.",
]


def with_article(job: str) -> str:
    return ("an " if job[0] in "aeiou" else "a ") + job


def make_rows(rng: random.Random, n: int, firsts, lasts, cities, ages, templates):
    rows, seen = [], set()
    while len(rows) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        age = rng.choice(ages)
        city = rng.choice(cities)
        job = rng.choice(JOBS)
        template = rng.choice(templates)
        text = template.format(
            name=name, age=age, city=city, job=job, a_job=with_article(job),
            year=rng.choice(YEARS), n=rng.randint(2, 9),
        )
        instruction = rng.choice(INSTRUCTIONS)
        if text in seen:
            continue
        seen.add(text)
        output = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
        rows.append(({"instruction": instruction, "input": text, "output": output},
                     template))
    return rows


def check_disjoint(train_rows, eval_rows) -> None:
    def disjoint(a, b, what):
        common = set(a) & set(b)
        assert not common, f"{what} overlap between train and eval: {sorted(common)}"

    disjoint(TRAIN_FIRST, EVAL_FIRST, "first names")
    disjoint(TRAIN_LAST, EVAL_LAST, "last names")
    disjoint(TRAIN_CITIES, EVAL_CITIES, "cities")
    disjoint(TRAIN_AGES, EVAL_AGES, "ages")
    disjoint(TRAIN_TEMPLATES, EVAL_TEMPLATES, "templates")
    for pool in (TRAIN_FIRST, TRAIN_LAST, TRAIN_CITIES, EVAL_FIRST, EVAL_LAST,
                 EVAL_CITIES, TRAIN_TEMPLATES, EVAL_TEMPLATES):
        assert len(pool) == len(set(pool)), "duplicate entry in a pool"

    # Values actually used, recovered from the outputs.
    def used(rows):
        vals = [json.loads(r["output"]) for r, _ in rows]
        return ({v["name"].split(" ", 1)[0] for v in vals},
                {v["name"].split(" ", 1)[1] for v in vals},
                {v["city"] for v in vals}, {v["age"] for v in vals},
                {t for _, t in rows})

    tf, tl, tc, ta, tt = used(train_rows)
    ef, el, ec, ea, et = used(eval_rows)
    for a, b, what in ((tf, ef, "used first names"), (tl, el, "used last names"),
                       (tc, ec, "used cities"), (ta, ea, "used ages"),
                       (tt, et, "used templates")):
        disjoint(a, b, what)

    # No eval city / full name string may appear anywhere in a train input.
    train_text = "\n".join(r["input"] for r, _ in train_rows)
    for r, _ in eval_rows:
        v = json.loads(r["output"])
        assert v["city"] not in train_text, f"eval city {v['city']!r} in train"
        assert v["name"] not in train_text, f"eval name {v['name']!r} in train"

    train_pairs = {(r["instruction"], r["input"]) for r, _ in train_rows}
    for r, _ in eval_rows:
        assert (r["instruction"], r["input"]) not in train_pairs, "eval pair in train"


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r, _ in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    train_rows = make_rows(rng, N_TRAIN, TRAIN_FIRST, TRAIN_LAST, TRAIN_CITIES,
                           TRAIN_AGES, TRAIN_TEMPLATES)
    eval_rows = make_rows(rng, N_EVAL, EVAL_FIRST, EVAL_LAST, EVAL_CITIES,
                          EVAL_AGES, EVAL_TEMPLATES)
    check_disjoint(train_rows, eval_rows)
    for r, _ in train_rows + eval_rows:  # sanity: output is exact, parseable JSON
        v = json.loads(r["output"])
        assert list(v) == ["name", "age", "city"] and isinstance(v["age"], int)
        assert v["name"] in r["input"] and v["city"] in r["input"]
        assert str(v["age"]) in r["input"]
    write_jsonl(OUT_DIR / "train.jsonl", train_rows)
    write_jsonl(OUT_DIR / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train rows -> {OUT_DIR / 'train.jsonl'}")
    print(f"wrote {len(eval_rows)} eval rows -> {OUT_DIR / 'eval.jsonl'}")


if __name__ == "__main__":
    main()

"""From config to training and eval sets: sources mixed by weight, de-duplicated, split, shuffled.

Every row that does not reach training is counted and kept with its reason (`rejects`), and every
choice (template, weights, eval source, de-duplication, seed, cache use) goes into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from .cache import SourceData, load_source, source_fingerprint
from .records import DataError, Example, format_problems
from .templates import added_token_ids, apply_template
from .tokenize import ChatEncoder, EncodeStats, Encoded, Skipped


def example_hash(example: Example) -> bytes:
    """8 bytes identifying an example's content exactly (the same conversation in any format)."""
    text = json.dumps([example.format == "text", example.messages], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def _stop_on_problems(sources: list[SourceData], on_error: str) -> None:
    problems = [p for s in sources for p in s.problems]
    if problems and on_error == "stop":
        names = ", ".join(s.spec for s in sources if s.problems)
        raise DataError(format_problems(names, problems, sum(s.rows for s in sources)))


def _weighted(items: list, weights: list[float], rng: random.Random) -> list:
    """Each source's items repeated by the integer part of its weight, plus a seeded sample for the rest."""
    out = []
    for i, w in enumerate(weights):
        part = [it for it in items if it[2] == i]
        out += part * int(w)
        rest = round(len(part) * (w - int(w)))
        if rest:
            out += rng.sample(part, rest)
    return out


def build_splits(cfg, tokenizer):
    from ..train import PreparedData

    d = cfg.data
    files = d.train_file if isinstance(d.train_file, list) else [d.train_file]
    if not files:
        raise DataError("data.train_file is an empty list; give at least one file")
    weights = list(d.train_weights) if d.train_weights else [1.0] * len(files)
    if len(weights) != len(files):
        raise DataError(f"data.train_weights has {len(weights)} entries but data.train_file has {len(files)}; "
                        "give one weight per file")
    if any(w <= 0 for w in weights):
        raise DataError(f"data.train_weights: every weight must be above 0, got {weights}")
    if d.eval_fraction and d.eval_file:
        raise DataError(f"data.eval_fraction={d.eval_fraction} and data.eval_file={d.eval_file!r} are both set; "
                        "choose one: set data.eval_file=null to hold out a fraction of the training rows")

    added = apply_template(tokenizer, d.template)
    encoder = ChatEncoder(tokenizer, d.max_length, d.truncation, d.train_on, d.system_prompt)
    sources = [load_source(f, encoder, d.format, d.cache) for f in files]
    _stop_on_problems(sources, d.on_error)

    rejects: list[dict[str, Any]] = [{**p.to_dict(), "stage": "read"} for s in sources for p in s.problems]
    items = []
    for i, s in enumerate(sources):
        if not s.examples:
            raise DataError(f"{s.spec}: no valid examples ({s.rows} rows read, {len(s.problems)} invalid)")
        items += [(ex, enc, i) for ex, enc in zip(s.examples, s.encoded)]

    removed = 0
    if d.dedup:
        seen, kept = set(), []
        for it in items:
            h = example_hash(it[0])
            if h in seen:
                removed += 1
                rejects.append({"source": it[0].source, "reason": "exact duplicate of an earlier example",
                                "stage": "dedup"})
                continue
            seen.add(h)
            kept.append(it)
        items = kept

    rng = random.Random(d.shuffle_seed)
    rng.shuffle(items)
    held_out: list = []
    if d.eval_fraction:
        n = max(1, round(len(items) * d.eval_fraction))
        if n >= len(items):
            raise DataError(f"data.eval_fraction={d.eval_fraction} leaves no training rows of {len(items)}")
        held_out, items = items[:n], items[n:]

    train_items = _weighted(items, weights, rng)
    rng.shuffle(train_items)
    if d.max_train_examples:
        train_items = train_items[: d.max_train_examples]

    train = [enc for _, enc, _ in train_items if isinstance(enc, Encoded)]
    skipped = list({enc.source: enc for _, enc, _ in train_items if isinstance(enc, Skipped)}.values())
    rejects += [{"source": s.source, "reason": s.reason, "stage": "encode"} for s in skipped]
    stats = EncodeStats(examples=len(train_items), kept=len(train), truncated=sum(e.truncated for e in train),
                        skipped=skipped, tokens=sum(len(e.input_ids) for e in train),
                        trained_tokens=sum(e.num_trained for e in train))
    if not train:
        raise DataError(f"{', '.join(map(str, files))}: no example is left to train on ({len(skipped)} skipped: "
                        f"{skipped[0].reason if skipped else 'empty'}); raise data.max_length "
                        "or set data.truncation=truncate_left")

    fingerprints: dict[str, Any] = {"train_file": source_fingerprint(files[0])}
    if len(files) > 1:
        fingerprints["train_files"] = [fingerprints["train_file"]] + [source_fingerprint(f) for f in files[1:]]
    from ..manifest import tokenizer_fingerprint

    fingerprints["tokenizer"] = tokenizer_fingerprint(tokenizer)
    prepared = PreparedData(encoder, train, stats, fingerprints=fingerprints, rejects=rejects,
                            added_tokens=added_token_ids(tokenizer, added))

    eval_source = None
    if d.eval_file:
        es = load_source(d.eval_file, encoder, d.format, d.cache)
        _stop_on_problems([es], d.on_error)
        rejects += [{**p.to_dict(), "stage": "read"} for p in es.problems]
        pairs = list(zip(es.examples, es.encoded))
        fingerprints["eval_file"] = source_fingerprint(d.eval_file)
        eval_source, sources = "file", sources + [es]
    else:
        pairs = [(ex, enc) for ex, enc, _ in held_out]
        eval_source = "fraction" if held_out else None
    if cfg.eval.max_examples:
        pairs = pairs[: cfg.eval.max_examples]
    prepared.eval = [enc for _, enc in pairs if isinstance(enc, Encoded)]
    rejects += [{"source": enc.source, "reason": enc.reason, "stage": "eval"} for _, enc in pairs
                if isinstance(enc, Skipped)]
    # Plain text has no prompt/answer, so it counts for eval loss but not for the generation metric.
    prepared.eval_examples = [ex for ex, enc in pairs if isinstance(enc, Encoded) and ex.format != "text"]

    formats: dict[str, int] = {}
    for s in sources:
        for k, v in s.formats.items():
            formats[k] = formats.get(k, 0) + v
    prepared.info = {
        "template": d.template or "tokenizer",
        "added_tokens": added,
        "formats": formats,
        "rows_read": sum(s.rows for s in sources),
        "invalid_rows": sum(len(s.problems) for s in sources),
        "on_error": d.on_error,
        "weights": dict(zip(map(str, files), weights)),
        "dedup": {"enabled": d.dedup, "removed": removed},
        "split": {"eval_source": eval_source, "eval_fraction": d.eval_fraction, "eval_examples": len(prepared.eval),
                  "eval_skipped": len(pairs) - len(prepared.eval),
                  "train_examples": len(train), "shuffle_seed": d.shuffle_seed},
        "ignored_files": [f for s in sources for f in s.ignored_files],
        "cache": [{"path": s.spec, "key": s.key, "hit": s.cache_hit} for s in sources],
    }
    return prepared

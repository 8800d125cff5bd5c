"""Reading what a run wrote: is a folder an adapter, which base it belongs to, its tokenizer, its config.

Every command that takes an adapter folder (eval, generate, chat, predict, merge, export, push,
method.init_adapter) opens it here, so "is this an adapter?" has one answer and one error, and
"the adapter's tokenizer, else the base's" is written once. Reading never writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError

ADAPTER_CONFIG = "adapter_config.json"
RUN_MANIFEST = "run_manifest.json"
RUN_CONFIG = "run_config.json"
MERGE_RECORD = "llm_finetune_merge.json"  # written by `merge` into the merged folder
SOURCE_RECORD = "llm_finetune_source.json"  # written when the default model is converted from its GGUF
RUN_LOCK = ".llm_finetune.lock"  # in output.dir while a run trains into it
CHECKPOINT_STAGING = ".partial"  # .checkpoint-N.partial: a checkpoint being written (never read by a resume)
ADALORA_STATE = "adalora_allocator.safetensors"  # in each AdaLoRA checkpoint: importance scores, rank pattern
SPIKE_GUARD_STATE = "spike_guard.json"  # in each checkpoint when train.spike_guard is on: its window, skips
RUN_IDENTITY = "llm_finetune_run.json"  # in each training checkpoint: resolved config + data fingerprints
PREFERENCE_REPORT = "preference_report.json"  # preference objectives: base vs tuned preference accuracy
PREFERENCE_DATA = ".preference_data"  # in output.dir, several processes: the rows TRL prepares, shared
# Weight files in Python's pickle format: loading one can run any code it holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file a run wrote; None when it is absent. A file that does not parse is an error
    naming it (a half-copied or hand-edited file is never read as empty)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot be read as JSON ({e}); restore it from the run, or delete the folder "
                            "and train again") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def has_tokenizer(path: str | Path) -> bool:
    """A folder with a saved tokenizer (an adapter trained with a template, a model folder)."""
    return (Path(path) / "tokenizer_config.json").is_file()


def is_model_folder(path: str | Path) -> bool:
    """A complete model (what `merge` or method.name=full writes): config.json and safetensors weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@dataclass
class AdapterFolder:
    """An adapter folder as a run left it: PEFT's adapter_config.json, and (when llm-finetune wrote it)
    run_manifest.json, run_config.json and the tokenizer the adapter was trained with."""

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    def tokenizer_path(self, base_path: str | Path) -> str:
        """The adapter's own tokenizer (it carries the template it was trained with), else the base's."""
        return str(self.path) if has_tokenizer(self.path) else str(base_path)

    @property
    def quantization(self) -> str:
        """The quantisation of the base it was trained on ('none', '4bit', '8bit')."""
        return self.manifest.get("quantization") or "none"

    def base_model(self, override: str | None = None) -> str:
        """The base it was trained on: `override` (--model) if given, else what its manifest recorded,
        else PEFT's base_model_name_or_path."""
        if override:
            return override
        model = self.manifest.get("model") or {}
        if model.get("kind") == "default":
            return "default"
        if model.get("kind") == "gguf" and model.get("original"):
            return model["original"]
        if model.get("kind") == "local" and model.get("load_path"):
            return model["load_path"]
        if model.get("hub_id"):
            return model["hub_id"]
        base = self.config.get("base_model_name_or_path")
        if not base:
            raise ArtifactError(f"{self.path}: cannot tell which base model it belongs to (no {RUN_MANIFEST} and no "
                                "base_model_name_or_path in its adapter_config.json); pass --model")
        return base


def pickle_weights(folder: str | Path) -> list[Path]:
    """The pickle weight files a loader would read from `folder`: those it holds when it has no
    safetensors weights (transformers and PEFT read safetensors first when both are there)."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def refuse_pickle(folder: str | Path, role: str, allow: bool) -> None:
    """ArtifactError naming the file unless `allow`: weights are read from safetensors only by default."""
    files = [] if allow else pickle_weights(folder)
    if files:
        raise ArtifactError(
            f"{role}: {files[0]}: weights stored as a Python pickle ({files[0].suffix}). Loading a pickle runs "
            "whatever code it holds, so a file from an untrusted source can take over this machine; this tool "
            "loads safetensors only. Use a safetensors copy (e.g. save_pretrained(..., safe_serialization=True) "
            "where you trust the file), or, if you trust its source, opt in: model.allow_pickle=true in the "
            "config (train, eval) or --allow-pickle (generate, chat, predict, merge, export).")


def open_adapter(path: str | Path, role: str = "adapter", allow_pickle: bool = False) -> AdapterFolder:
    """The adapter folder at `path`, or an ArtifactError that says what `path` is instead and what to pass.

    `role` names where the path came from in the message (e.g. "--adapter", "method.init_adapter").
    Pickle weights are refused unless `allow_pickle` (model.allow_pickle / --allow-pickle)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{role}: {path}: not an adapter folder: it does not exist (train one first with "
                            "`llm-finetune train`, or give the folder it wrote, e.g. checkpoints/adapter_model)")
    if not is_adapter_folder(path):
        if (path / "config.json").is_file():  # what method.name=full and `merge` write
            raise ArtifactError(f"{role}: {path}: a complete model (full fine-tuning or a merge), not an adapter; "
                                f"pass it as --model {path}")
        raise ArtifactError(f"{role}: {path}: not an adapter folder (no {ADAPTER_CONFIG}). Pass the folder written "
                            "by `llm-finetune train`, e.g. checkpoints/adapter_model")
    refuse_pickle(path, role, allow_pickle)
    return AdapterFolder(path, read_json(path / ADAPTER_CONFIG) or {}, read_json(path / RUN_MANIFEST) or {})


def original_gguf(folder: str | Path) -> Path | None:
    """The GGUF file a model folder came from, if any (the built-in default is converted from one; a
    merged folder records its base's)."""
    folder = Path(folder)
    source = read_json(folder / SOURCE_RECORD)
    if source and source.get("gguf"):
        return Path(source["gguf"])
    merged = read_json(folder / MERGE_RECORD)
    if merged and (merged.get("base") or {}).get("original"):
        return Path(merged["base"]["original"])
    return None

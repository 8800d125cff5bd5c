"""Helpers for the tests of what comes after training: a briefly trained tiny adapter."""

from __future__ import annotations

from pathlib import Path

from conftest import extraction_rows, write_jsonl


def train_tiny_adapter(root: Path, model_dir: Path, steps: int = 12, extra: list[str] | None = None) -> Path:
    """Train the tiny model for a few steps (seconds) and return the adapter folder.

    The learning rate is high so the adapter visibly changes the model's outputs.
    """
    from llm_finetune.config import load_config
    from llm_finetune.train import run

    write_jsonl(root / "train.jsonl", extraction_rows(24))
    write_jsonl(root / "eval.jsonl", extraction_rows(4, offset=100))
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}",
        f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "method.dropout=0.0",
        "train.learning_rate=0.01", f"train.max_steps={steps}", "train.logging_steps=4", "train.warmup_ratio=0.0",
        "eval.max_new_tokens=8", f"output.dir={root / 'checkpoints'}",
        f"output.logs_dir={root / 'logs'}", *(extra or []),
    ])
    return run(cfg).adapter_dir

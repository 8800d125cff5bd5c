"""Rows read as prompts for inference (`predict`): the training formats, with the answer optional.

Rows are validated by the training readers (same rules, same messages), so a file that trains
also predicts, and a bad row is named by its line before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .records import _text, alpaca_to_messages, chat_to_messages, detect_format
from .rows import RowProblem, iter_jsonl


@dataclass
class PromptRow:
    messages: list[dict[str, Any]]  # what the model is asked: ends with a user turn
    reference: str | None  # the expected answer when the row has one
    source: str  # "path:line"
    format: str


_PLACEHOLDER = {"role": "assistant", "content": "placeholder"}


def row_to_prompt(row: Any, fmt: str, path: str, line: int) -> PromptRow:
    """A row of any training format read as a prompt; rows without an answer are accepted.

    Rows are validated by the training readers (same rules, same messages) with a placeholder
    answer where there is none, which is then dropped again.
    """
    if not isinstance(row, dict):
        raise ValueError(f"each row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto" and "prompt" in row and "messages" not in row and "instruction" not in row:
        return PromptRow([{"role": "user", "content": _text(row, "prompt")}], row.get("reference"),
                         f"{path}:{line}", "prompt")
    name = detect_format(row) if fmt == "auto" else fmt
    if name == "alpaca" or (name is None and "instruction" in row):
        answered = isinstance(row.get("output"), str) and bool(row["output"].strip())
        messages = alpaca_to_messages(row if answered else {**row, "output": _PLACEHOLDER["content"]})
        return PromptRow(messages[:-1], row["output"] if answered else None, f"{path}:{line}", "alpaca")
    if name == "messages":
        raw = row.get("messages")
        if isinstance(raw, list) and raw and not any(isinstance(m, dict) and m.get("role") == "user" for m in raw):
            raise ValueError("the conversation has no user turn, so there is nothing to answer; end it with a "
                             "user message")
        ends_with_user = (isinstance(raw, list) and raw and isinstance(raw[-1], dict)
                          and str(raw[-1].get("role", "")).strip().lower() == "user")
        messages = chat_to_messages({**row, "messages": list(raw) + [_PLACEHOLDER]} if ends_with_user else row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = None if ends_with_user else messages[last]["content"]
        return PromptRow([{"role": m["role"], "content": m["content"]} for m in messages[:last]], reference,
                         f"{path}:{line}", "messages")
    raise ValueError(f"unrecognised record with keys {sorted(row)}; expected alpaca (instruction, input), "
                     "chat (messages ending with a user turn) or {\"prompt\": ...}")


def load_prompts(path: str | Path, fmt: str = "auto", max_listed: int = 10) -> list[PromptRow]:
    """Read every prompt of a file, or stop with every bad row listed (nothing is generated)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    prompts, problems, rows = [], [], 0
    for line, row in iter_jsonl(path):
        rows += 1
        if isinstance(row, RowProblem):
            problems.append(row)
            continue
        try:
            prompts.append(row_to_prompt(row, fmt, str(path), line))
        except ValueError as e:
            problems.append(RowProblem(str(path), line, str(e)))
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:max_listed])
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise DataError(f"{len(problems)} invalid row(s) in {path} (of {rows}); nothing was generated. "
                        f"Fix these rows:\n{listed}{more}")
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts

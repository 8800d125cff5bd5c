"""Read data files into one record type, validating every row and naming the line of each problem.

Every supported format becomes an `Example`: a list of chat messages (role, content, and whether the
message is trained), plus where it came from (file and line) so any later problem can point back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from .conversation import MESSAGES_ROLES, SHAREGPT_ROLES, content_text, normalise, resolve_role, role_table, train_flag
from .rows import RowProblem, iter_rows


@dataclass
class Example:
    messages: list[dict[str, Any]]  # {"role", "content"} plus optional "train": bool
    source: str  # "path:line"
    format: str  # the format it was read as
    # What the reader repaired in this row (see `conversation`); not part of its identity.
    notes: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """Everything before the last assistant turn: what a user sends at inference."""
        if self.format == "text":  # plain text has no prompt: all of it is trained
            return []
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        if self.format == "text":
            return self.messages[0]["content"]
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def example_hash(example: Example) -> bytes:
    """8 bytes identifying an example's content exactly (the same conversation in any format)."""
    text = json.dumps([example.format == "text", example.messages], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


@dataclass
class ReadResult:
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    rows: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)  # in a folder, files of no supported type
    file_problems: list[RowProblem] = field(default_factory=list)  # scope "file", not counted as rows
    repairs: dict[str, int] = field(default_factory=dict)  # rows the reader repaired, by rule


# ---------------------------------------------------------------------------------------------
# Formats: each takes a parsed row and returns messages, or raises ValueError with the reason.


def _text(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing required field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def alpaca_to_messages(row: dict, roles: dict[str, str] | None = None, notes: list[str] | None = None
                       ) -> list[dict]:
    """instruction (+ input) -> user, output -> assistant; optional system and history [[q, a], ...]."""
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    output = _text(row, "output")
    messages = []
    system = _text(row, "system", required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise ValueError("field 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"history[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def chat_to_messages(row: dict, roles: dict[str, str] | None = None, notes: list[str] | None = None) -> list[dict]:
    """`messages` = [{"role", "content", "train"?}, ...]; cleaned up by the rules of `conversation`."""
    raw = row.get("messages")
    if raw == []:
        raise ValueError("field 'messages' is an empty list: the conversation has no turns")
    if not isinstance(raw, list):
        raise ValueError("field 'messages' must be a non-empty list of {role, content} objects")
    table = role_table(MESSAGES_ROLES, roles)
    messages, where = [], []
    for i, m in enumerate(raw):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content'")
        if "role" not in m:
            raise ValueError(f"{at}: missing required field 'role'")
        role = resolve_role(m["role"], table, at, "role")
        messages.append({"role": role, "content": content_text(m.get("content"), at, "content"),
                         **train_flag(m, at)})
        where.append(at)
    return normalise(messages, where, notes)


# A ShareGPT turn names its speaker in "from" (some tools write "role") and its text in "value"
# (some write "content", "text" or "markdown"); the first key present is used.
_SPEAKER_KEYS = ("from", "role")
_TEXT_KEYS = ("value", "content", "text", "markdown")


def sharegpt_to_messages(row: dict, roles: dict[str, str] | None = None, notes: list[str] | None = None
                         ) -> list[dict]:
    """ShareGPT: `conversations` = [{"from": "human"|"gpt"|"system"|..., "value": text}, ...]."""
    raw = row.get("conversations")
    if raw == []:
        raise ValueError("field 'conversations' is an empty list: the conversation has no turns")
    if not isinstance(raw, list):
        raise ValueError("field 'conversations' must be a non-empty list of {from, value} objects")
    table = role_table(SHAREGPT_ROLES, roles)
    messages, where = [], []
    for i, turn in enumerate(raw):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{at} must be an object with 'from' and 'value'")
        speaker = next((k for k in _SPEAKER_KEYS if k in turn), None)
        if speaker is None:
            raise ValueError(f"{at}: missing required field 'from'")
        text = next((k for k in _TEXT_KEYS if k in turn), None)
        if text is None:
            raise ValueError(f"{at}: missing required field 'value'")
        role = resolve_role(turn[speaker], table, at, speaker)
        messages.append({"role": role, "content": content_text(turn[text], at, text), **train_flag(turn, at)})
        where.append(at)
    return normalise(messages, where, notes)


def prompt_completion_to_messages(row: dict, roles: dict[str, str] | None = None,
                                  notes: list[str] | None = None) -> list[dict]:
    """`prompt` + `completion`: two strings, or (TRL's conversational form) two lists of messages."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise ValueError("'prompt' and 'completion' must both be strings or both lists of messages")
        return chat_to_messages({"messages": prompt + completion}, roles, notes)
    return [{"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")}]


def text_to_messages(row: dict, roles: dict[str, str] | None = None, notes: list[str] | None = None
                     ) -> list[dict]:
    """Plain text for continued pre-training: one pseudo-message, every token trained."""
    return [{"role": "text", "content": _text(row, "text")}]


FORMATS = {
    "alpaca": alpaca_to_messages,
    "messages": chat_to_messages,
    "sharegpt": sharegpt_to_messages,
    "prompt_completion": prompt_completion_to_messages,
    "text": text_to_messages,
}


def detect_format(row: dict) -> str | None:
    """The first matching format by its telltale key; `data.format` overrides this per run."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def row_to_example(row: Any, fmt: str, path: str, line: int, unit: str = "line",
                   roles: dict[str, str] | None = None) -> Example:
    """One parsed row as an Example; `roles` maps extra role names (data.roles) for the chat formats."""
    if not isinstance(row, dict):
        raise ValueError(f"each row must be a JSON object, got {type(row).__name__}")
    name = detect_format(row) if fmt == "auto" else fmt
    if name is None:
        raise ValueError(f"unrecognised record with keys {sorted(row)}; expected alpaca "
                         "(instruction, input, output), chat (messages), ShareGPT (conversations), "
                         "prompt/completion, or text")
    where = f"{path}:{line}" if unit == "line" else f"{path}:{unit} {line}"
    notes: list[str] = []
    messages = FORMATS[name](row, roles=roles, notes=notes)
    return Example(messages=messages, source=where, format=name, notes=notes)


# ---------------------------------------------------------------------------------------------
# Files


def iter_examples(path: str | Path, fmt: str = "auto", result: ReadResult | None = None,
                  roles: dict[str, str] | None = None) -> Iterator[Example | RowProblem]:
    """Stream a file, folder or dataset as examples and problems; counts go into `result`.

    A problem of scope "file" (a .json array cut part-way) is yielded too but is not a row: it goes
    to `result.file_problems`, and the rows read before it count as usual.
    """
    result = result if result is not None else ReadResult()
    for file, line, unit, row in iter_rows(path, result.ignored_files):
        if isinstance(row, RowProblem) and row.scope == "file":
            result.file_problems.append(row)
            yield row
            continue
        result.rows += 1
        if isinstance(row, RowProblem):
            yield row
            continue
        try:
            example = row_to_example(row, fmt, file, line, unit, roles)
        except ValueError as e:
            yield RowProblem(file, line, str(e), unit)
            continue
        result.formats[example.format] = result.formats.get(example.format, 0) + 1
        for note in example.notes:
            result.repairs[note] = result.repairs.get(note, 0) + 1
        yield example


def read_examples(path: str | Path, fmt: str = "auto", roles: dict[str, str] | None = None) -> ReadResult:
    """Every example and row problem of a source; file-level problems land in `file_problems`."""
    result = ReadResult()
    for item in iter_examples(path, fmt, result, roles):
        if isinstance(item, RowProblem):
            if item.scope != "file":
                result.problems.append(item)
        else:
            result.examples.append(item)
    return result


def format_problems(path, problems: list[RowProblem], rows: int, max_listed: int = 10,
                    file_problems: list[RowProblem] = ()) -> str:
    """The error that stops a run: file-level problems first (each once), then the bad rows counted."""
    parts = []
    if file_problems:
        listed = "\n".join(f"  {p}" for p in file_problems)
        parts.append(f"{len(file_problems)} file problem(s); nothing was trained or written:\n{listed}\n"
                     f"  The {rows} row(s) before the cut were read. Re-export the file, or set data.on_error=skip "
                     "to train on those rows.")
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:max_listed])
        more = len(problems) - max_listed
        tail = f"\n  ... and {more} more" if more > 0 else ""
        parts.append(f"{len(problems)} invalid row(s) in {path} (of {rows}); nothing was trained or written. "
                     f"Fix these rows (or set data.on_error=skip to train on the valid ones):\n{listed}{tail}")
    return "\n".join(parts)


def load_examples(path: str | Path, fmt: str = "auto", max_listed: int = 10,
                  roles: dict[str, str] | None = None) -> ReadResult:
    """Read a file and stop with every problem counted (the first few listed) if any row is bad."""
    result = read_examples(path, fmt, roles)
    if result.problems or result.file_problems:
        raise DataError(format_problems(path, result.problems, result.rows, max_listed, result.file_problems))
    if not result.examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return result

"""Read data files into one record type, validating every row and naming the line of each problem.

Every supported format becomes an `Example`: a list of chat messages (role, content, and whether the
message is trained), plus where it came from (file and line) so any later problem can point back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the fix."""


@dataclass
class Example:
    messages: list[dict[str, Any]]  # {"role", "content"} plus optional "train": bool
    source: str  # "path:line"
    format: str  # the format it was read as

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """Everything before the last assistant turn: what a user sends at inference."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


@dataclass
class RowProblem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ReadResult:
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    rows: int = 0
    formats: dict[str, int] = field(default_factory=dict)


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


def alpaca_to_messages(row: dict) -> list[dict]:
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


def chat_to_messages(row: dict) -> list[dict]:
    raw = row.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError("field 'messages' must be a non-empty list of {role, content} objects")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            if role == "tool" or role == "function":
                raise ValueError(
                    f"messages[{i}]: role '{role}' (tool calls) is not supported for training yet; "
                    "remove tool turns or fold their result into the user turn"
                )
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: 'content' must be a string, got {type(content).__name__}")
        msg = {"role": role, "content": content}
        if "train" in m:
            if not isinstance(m["train"], bool):
                raise ValueError(f"messages[{i}]: 'train' must be true or false")
            msg["train"] = m["train"]
        messages.append(msg)
    check_turn_order(messages)
    return messages


def check_turn_order(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise ValueError("a system message may only come first")
    turns = [r for r in roles if r != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"roles out of order: turn {i + 1} is '{role}', expected '{expected}' "
                             "(user and assistant must alternate, starting with user)")
    if "assistant" not in turns:
        raise ValueError("the conversation has no assistant turn, so nothing would be trained")
    if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise ValueError("an assistant message is empty")


FORMATS = {"alpaca": alpaca_to_messages, "messages": chat_to_messages}


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def row_to_example(row: Any, fmt: str, path: str, line: int) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"each row must be a JSON object, got {type(row).__name__}")
    name = detect_format(row) if fmt == "auto" else fmt
    if name is None:
        raise ValueError(f"unrecognised record with keys {sorted(row)}; expected alpaca "
                         "(instruction, input, output) or chat (messages)")
    return Example(messages=FORMATS[name](row), source=f"{path}:{line}", format=name)


# ---------------------------------------------------------------------------------------------
# Files


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any | RowProblem]]:
    """Yield (line number, parsed row or problem), streaming; BOM, CRLF and blank lines accepted."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, RowProblem(str(path), number, f"bytes that are not UTF-8 at column {e.start + 1}; "
                                                           "re-save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                yield number, RowProblem(str(path), number, f"invalid JSON at column {e.colno}: {e.msg}")


def read_examples(path: str | Path, fmt: str = "auto") -> ReadResult:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl (one JSON object per line)")
    result = ReadResult()
    for line, row in iter_jsonl(path):
        result.rows += 1
        if isinstance(row, RowProblem):
            result.problems.append(row)
            continue
        try:
            example = row_to_example(row, fmt, str(path), line)
        except ValueError as e:
            result.problems.append(RowProblem(str(path), line, str(e)))
            continue
        result.examples.append(example)
        result.formats[example.format] = result.formats.get(example.format, 0) + 1
    return result


def load_examples(path: str | Path, fmt: str = "auto", max_listed: int = 10) -> ReadResult:
    """Read a file and stop with every problem counted (the first few listed) if any row is bad."""
    result = read_examples(path, fmt)
    if result.problems:
        listed = "\n".join(f"  {p}" for p in result.problems[:max_listed])
        more = len(result.problems) - max_listed
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(f"{len(result.problems)} invalid row(s) in {path} (of {result.rows}); nothing was "
                        f"trained or written. Fix these rows:\n{listed}{tail}")
    if not result.examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return result


# ---------------------------------------------------------------------------------------------
# Prompts for inference: the same formats, but the answer is optional.


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
        ends_with_user = isinstance(raw, list) and raw and isinstance(raw[-1], dict) and raw[-1].get("role") == "user"
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

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
        if self.format == "text":  # plain text has no prompt: all of it is trained
            return []
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        if self.format == "text":
            return self.messages[0]["content"]
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


@dataclass
class RowProblem:
    path: str
    line: int
    reason: str
    unit: str = "line"  # "row" for files without lines (parquet, hub datasets)

    def __str__(self) -> str:
        where = f"{self.line}" if self.unit == "line" else f"{self.unit} {self.line}"
        return f"{self.path}:{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, self.unit: self.line, "reason": self.reason}


@dataclass
class ReadResult:
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    rows: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)  # in a folder, files of no supported type


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
            if role in TOOL_ROLES:
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


# ShareGPT's role spellings; anything else is reported as unknown, never guessed.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant",
}
# The stated rule for tool turns, in every chat format: rejected with the row named, because a
# template that has no tool role would otherwise render them as something they are not.
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")


def _tool_rule(where: str, role: str) -> ValueError:
    return ValueError(f"{where}: role '{role}' (tool calls) is not supported for training; "
                      "remove tool turns or fold their result into the user turn")


def sharegpt_to_messages(row: dict) -> list[dict]:
    """ShareGPT: `conversations` = [{"from": "human"|"gpt"|"system"|..., "value": text}, ...]."""
    raw = row.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise ValueError("field 'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}] must be an object with 'from' and 'value'")
        if "from" not in turn:
            raise ValueError(f"conversations[{i}]: missing required field 'from'")
        spoken = turn["from"]
        if not isinstance(spoken, str):
            raise ValueError(f"conversations[{i}]: 'from' must be a string, got {type(spoken).__name__}")
        role = SHAREGPT_ROLES.get(spoken.lower())
        if role is None:
            if spoken.lower() in TOOL_ROLES:
                raise _tool_rule(f"conversations[{i}]", spoken)
            raise ValueError(f"conversations[{i}]: unknown role {spoken!r}; expected one of "
                             f"{', '.join(SHAREGPT_ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"conversations[{i}]: 'value' must be a string, got {type(value).__name__}")
        msg = {"role": role, "content": value}
        if "train" in turn:
            if not isinstance(turn["train"], bool):
                raise ValueError(f"conversations[{i}]: 'train' must be true or false")
            msg["train"] = turn["train"]
        messages.append(msg)
    check_turn_order(messages)
    return messages


def prompt_completion_to_messages(row: dict) -> list[dict]:
    """`prompt` + `completion`: two strings, or (TRL's conversational form) two lists of messages."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise ValueError("'prompt' and 'completion' must both be strings or both lists of messages")
        return chat_to_messages({"messages": prompt + completion})
    return [{"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")}]


def text_to_messages(row: dict) -> list[dict]:
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


def row_to_example(row: Any, fmt: str, path: str, line: int, unit: str = "line") -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"each row must be a JSON object, got {type(row).__name__}")
    name = detect_format(row) if fmt == "auto" else fmt
    if name is None:
        raise ValueError(f"unrecognised record with keys {sorted(row)}; expected alpaca "
                         "(instruction, input, output), chat (messages), ShareGPT (conversations), "
                         "prompt/completion, or text")
    where = f"{path}:{line}" if unit == "line" else f"{path}:{unit} {line}"
    return Example(messages=FORMATS[name](row), source=where, format=name)


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


def iter_examples(path: str | Path, fmt: str = "auto", result: ReadResult | None = None
                  ) -> Iterator[Example | RowProblem]:
    """Stream a file, folder or dataset as examples and problems; counts go into `result`."""
    from .files import iter_rows

    result = result if result is not None else ReadResult()
    for file, line, unit, row in iter_rows(path, result.ignored_files):
        result.rows += 1
        if isinstance(row, RowProblem):
            yield row
            continue
        try:
            example = row_to_example(row, fmt, file, line, unit)
        except ValueError as e:
            yield RowProblem(file, line, str(e), unit)
            continue
        result.formats[example.format] = result.formats.get(example.format, 0) + 1
        yield example


def read_examples(path: str | Path, fmt: str = "auto") -> ReadResult:
    result = ReadResult()
    for item in iter_examples(path, fmt, result):
        if isinstance(item, RowProblem):
            result.problems.append(item)
        else:
            result.examples.append(item)
    return result


def format_problems(path, problems: list[RowProblem], rows: int, max_listed: int = 10) -> str:
    listed = "\n".join(f"  {p}" for p in problems[:max_listed])
    more = len(problems) - max_listed
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{len(problems)} invalid row(s) in {path} (of {rows}); nothing was trained or written. " \
           f"Fix these rows (or set data.on_error=skip to train on the valid ones):\n{listed}{tail}"


def load_examples(path: str | Path, fmt: str = "auto", max_listed: int = 10) -> ReadResult:
    """Read a file and stop with every problem counted (the first few listed) if any row is bad."""
    result = read_examples(path, fmt)
    if result.problems:
        raise DataError(format_problems(path, result.problems, result.rows, max_listed))
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

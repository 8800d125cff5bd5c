"""Preference data (train.objective dpo / orpo / simpo: pairs; kto: single answers marked good or bad), read
and validated like the rest: every problem names file:line.

Formats (detected per row):
- `{"prompt", "chosen", "rejected"}`: strings, or TRL's conversational form (`prompt` a list of messages,
  `chosen` / `rejected` the answer's messages, or whole conversations that repeat the prompt);
- alpaca-style `{"instruction", "input"?, "system"?, "chosen", "rejected"}`;
- ShareGPT-style `{"conversations": [...turns before the answer...], "chosen": {"from": "gpt", "value"},
  "rejected": {...}}`;
- KTO's unpaired `{"prompt", "completion", "label": true|false}` (a pair row is two KTO rows: chosen good,
  rejected bad).
Each answer becomes an `Example` through the SFT readers (records.py), so roles, system prompts, templates
and masking are the same as for supervised data; what is new is checked here: both answers present and
non-empty, not identical, the same prompt on both sides, a true/false label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..manifest import tokenizer_fingerprint
from .cache import source_fingerprint
from .records import FORMATS, Example, ReadResult, format_problems
from .rows import RowProblem, iter_rows
from .templates import added_token_ids
from .tokenize import Encoded, encoder_for

PAIRED = ("dpo", "orpo", "simpo")


@dataclass
class PreferenceRow:
    """One preference row: `chosen` and `rejected` (pairs), or `chosen` alone with `label` (KTO)."""

    chosen: Example  # the whole conversation ending with the (preferred, or KTO-labelled) answer
    rejected: Example | None
    label: bool | None = None  # KTO: is `chosen` desirable
    source: str = ""

    @property
    def prompt(self) -> list[dict[str, Any]]:
        return self.chosen.prompt_messages

    def trl_row(self, system_prompt: str | None = None) -> dict[str, Any]:
        """TRL's conversational form: prompt messages (data.system_prompt first where the row has no system
        message, as the training template adds it), then the answer(s) as assistant messages."""
        prompt = [{"role": m["role"], "content": m["content"]} for m in self.prompt]
        if system_prompt and not any(m["role"] == "system" for m in prompt):
            prompt.insert(0, {"role": "system", "content": system_prompt})
        answer = [{"role": "assistant", "content": self.chosen.answer}]
        if self.rejected is None:
            return {"prompt": prompt, "completion": answer, "label": bool(self.label)}
        rejected = [{"role": "assistant", "content": self.rejected.answer}]
        return {"prompt": prompt, "chosen": answer, "rejected": rejected}


def _answer_text(value: Any, field: str) -> str:
    """A ShareGPT answer turn ({"from": "gpt", "value"}) or a string."""
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise ValueError(f"field '{field}' must be a string (or a {{from, value}} turn), got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{field}' is empty: every answer needs text")
    return value


def _conversation(row: dict, answer_key: str, roles: dict[str, str] | None) -> tuple[str, list[dict]]:
    """The conversation that ends with row[answer_key], as the SFT reader of the row's shape builds it."""
    answer = row.get(answer_key)
    if "conversations" in row:  # ShareGPT: the turns before the answer, the answer as a separate turn
        text = _answer_text(answer, answer_key)
        turns = list(row["conversations"]) if isinstance(row["conversations"], list) else row["conversations"]
        return "sharegpt", FORMATS["sharegpt"]({"conversations": [*turns, {"from": "gpt", "value": text}]}, roles)
    if "instruction" in row:
        return "alpaca", FORMATS["alpaca"]({**{k: row[k] for k in ("instruction", "input", "system") if k in row},
                                            "output": _answer_text(answer, answer_key)}, roles)
    prompt = row.get("prompt")
    if isinstance(prompt, list) or isinstance(answer, list):
        if not isinstance(answer, list) or not answer:
            raise ValueError(f"field '{answer_key}' must be a non-empty list of messages when 'prompt' is one")
        if not isinstance(prompt, list):
            raise ValueError(f"field 'prompt' must be a list of messages when '{answer_key}' is one")
        repeats = len(answer) > len(prompt) and answer[:len(prompt)] == prompt  # a whole conversation
        messages = FORMATS["messages"]({"messages": answer if repeats else prompt + answer}, roles)
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise ValueError(f"field '{answer_key}': the conversation must end with a non-empty assistant answer")
        return "messages", messages
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing required field 'prompt' (or 'instruction', or 'conversations')")
    return "prompt_completion", [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": _answer_text(answer, answer_key)}]


def row_to_preference(row: Any, objective: str, path: str, line: int, unit: str = "line",
                      roles: dict[str, str] | None = None) -> list[PreferenceRow]:
    """One parsed row as preference rows (a pair row read for KTO gives two); ValueError names the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"each row must be a JSON object, got {type(row).__name__}")
    where = f"{path}:{line}" if unit == "line" else f"{path}:{unit} {line}"
    if "completion" in row or "label" in row:
        if objective in PAIRED:
            raise ValueError(f"a KTO row (prompt, completion, label) cannot train train.objective={objective}, "
                             "which needs pairs (prompt, chosen, rejected); use train.objective=kto")
        label = row.get("label")
        if not isinstance(label, bool):
            raise ValueError("field 'label' must be true (a desirable answer) or false (an undesirable one), got "
                             + ("nothing" if label is None else repr(label)))
        fmt, messages = _conversation(row, "completion", roles)
        return [PreferenceRow(Example(messages, where, fmt), None, label, where)]
    missing = [k for k in ("chosen", "rejected") if k not in row or row[k] is None]
    if missing:
        raise ValueError(f"missing required field(s) {', '.join(repr(k) for k in missing)}: a preference row needs "
                         "a chosen and a rejected answer (or, for train.objective=kto, 'completion' and 'label')")
    fmt, chosen = _conversation(row, "chosen", roles)
    _, rejected = _conversation(row, "rejected", roles)
    a, b = Example(chosen, where, fmt), Example(rejected, where, fmt)
    if a.prompt_messages != b.prompt_messages:
        raise ValueError("the chosen and the rejected answer continue different prompts; both must answer the "
                         "same conversation")
    if " ".join(a.answer.split()) == " ".join(b.answer.split()):
        raise ValueError("the chosen and the rejected answer are identical: a pair must differ to teach a preference")
    if objective == "kto":  # a pair, read as two single answers: the chosen one good, the rejected one bad
        return [PreferenceRow(a, None, True, where), PreferenceRow(b, None, False, where)]
    return [PreferenceRow(a, b, None, where)]


def read_preferences(path: str | Path, objective: str, roles: dict[str, str] | None = None
                     ) -> tuple[list[PreferenceRow], ReadResult]:
    """Every preference row of a source, and its problems (in the ReadResult, as for SFT data)."""
    result = ReadResult()
    rows: list[PreferenceRow] = []
    for file, line, unit, row in iter_rows(path, result.ignored_files):
        if isinstance(row, RowProblem):
            (result.file_problems if row.scope == "file" else result.problems).append(row)
            continue
        result.rows += 1
        try:
            rows += row_to_preference(row, objective, file, line, unit, roles)
        except ValueError as e:
            result.problems.append(RowProblem(file, line, str(e), unit))
    return rows, result


def load_preferences(path: str | Path, objective: str, on_error: str = "stop", roles: dict[str, str] | None = None
                     ) -> tuple[list[PreferenceRow], ReadResult]:
    """read_preferences that stops (DataError, every problem counted, the first few listed) on a bad row unless
    data.on_error=skip, and on a source without rows."""
    rows, result = read_preferences(path, objective, roles)
    if result.file_problems or (result.problems and on_error == "stop"):
        raise DataError(format_problems(path, result.problems, result.rows, 10, result.file_problems))
    if not rows:
        raise DataError(f"{path}: no usable preference rows (train.objective={objective})")
    if objective == "kto" and len({r.label for r in rows}) < 2:
        raise DataError(f"{path}: every row is labelled {rows[0].label}; KTO needs desirable (true) and undesirable "
                        "(false) answers")
    return rows, result


@dataclass
class PreferenceStats:
    rows: int  # rows read (a pair row read for KTO gives two answers)
    kept: int
    skipped: int  # bad rows skipped (data.on_error=skip) or answers too long for data.max_length

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class PreferenceData:
    """The preference rows of a run, and what the engine reads from any run's data (train.py): `train` / `eval`
    hold each row's chosen conversation encoded (the saved-adapter check's fixed batch), `fingerprints` and
    `info` go into checkpoints and the manifest."""

    encoder: Any
    rows: list[PreferenceRow]
    eval_rows: list[PreferenceRow]
    train: list
    eval: list
    train_stats: PreferenceStats
    fingerprints: dict[str, Any]
    info: dict[str, Any]
    added_tokens: list[int]


def prepare_preferences(cfg, tokenizer) -> PreferenceData:
    """Read, validate and split the preference data for cfg.train.objective; encode each answer with the
    training template (an answer that does not fit data.max_length is dropped, counted)."""
    d, objective = cfg.data, cfg.train.objective
    added, encoder = encoder_for(d, tokenizer)
    files = d.train_file if isinstance(d.train_file, list) else [d.train_file]
    rows: list[PreferenceRow] = []
    read = 0
    for f in files:
        found, result = load_preferences(f, objective, d.on_error, d.roles)
        rows, read = rows + found, read + result.rows
    rng = random.Random(d.shuffle_seed)
    rng.shuffle(rows)  # KTO's sampler is sequential: desirable and undesirable answers mixed in every batch
    eval_rows: list[PreferenceRow] = []
    if d.eval_file:
        eval_rows, _ = load_preferences(d.eval_file, objective, d.on_error, d.roles)
    elif d.eval_fraction:
        cut = max(1, int(len(rows) * d.eval_fraction))
        rows, eval_rows = rows[cut:], rows[:cut]

    def fits(r: PreferenceRow) -> bool:
        return all(isinstance(encoder.encode(e), Encoded) for e in (r.chosen, r.rejected) if e is not None)

    kept = [r for r in rows if fits(r)]
    eval_rows = [r for r in eval_rows if fits(r)]
    if not kept:
        raise DataError(f"{files[0]}: no preference row fits data.max_length={d.max_length}")
    fingerprints = {"train_file": source_fingerprint(files[0]), "tokenizer": tokenizer_fingerprint(tokenizer)}
    if d.eval_file:
        fingerprints["eval_file"] = source_fingerprint(d.eval_file)
    return PreferenceData(encoder, kept, eval_rows, [encoder.encode(r.chosen) for r in kept[:8]],
                          [encoder.encode(r.chosen) for r in eval_rows[:8]],
                          PreferenceStats(read, len(kept), len(rows) - len(kept)), fingerprints,
                          {"objective": objective, "added_tokens": added}, added_token_ids(tokenizer, added))


def check_preferences(spec: str | Path, objective: str, encoder, roles: dict[str, str] | None = None,
                      max_listed: int = 20) -> tuple[bool, str]:
    """`data check FILE` for a preference objective: rows, problems by file:line, answers that do not fit
    data.max_length, and the token lengths of each side. (ok, the text to print)."""
    rows, result = read_preferences(spec, objective, roles)
    lines = [f"{spec}: {result.rows} row(s) read as train.objective={objective}: {len(rows)} "
             f"{'pair(s)' if objective in PAIRED else 'labelled answer(s)'}, {len(result.problems)} invalid"]
    lines += [f"  {p}" for p in (result.file_problems + result.problems)[:max_listed]]
    sides: dict[str, list[int]] = {"chosen": [], "rejected": []} if objective in PAIRED else {"desirable": [],
                                                                                             "undesirable": []}
    too_long = []
    for r in rows:
        answers = [("chosen", r.chosen), ("rejected", r.rejected)] if r.rejected is not None else \
            [("desirable" if r.label else "undesirable", r.chosen)]
        for side, example in answers:
            encoded = encoder.encode(example)
            if isinstance(encoded, Encoded):
                sides[side].append(len(encoded.input_ids))
            else:
                too_long.append(f"  {r.source} ({side}): {encoded.reason}")
    for side, lengths in sides.items():
        if lengths:
            lines.append(f"  {side}: {len(lengths)} answer(s), {min(lengths)}-{max(lengths)} tokens with the prompt "
                         f"(mean {sum(lengths) / len(lengths):.0f})")
    if too_long:
        lines.append(f"  {len(too_long)} answer(s) not used (data.max_length={encoder.max_length}):")
        lines += too_long[:max_listed]
    ok = not (result.problems or result.file_problems) and bool(rows)
    lines.append("OK" if ok else "PROBLEMS: fix the rows above (or set data.on_error=skip)")
    return ok, "\n".join(lines)


def preview_preferences(spec: str | Path, objective: str, encoder, n: int = 3,
                        roles: dict[str, str] | None = None) -> int:
    """`data preview FILE` for a preference objective: the first n rows as the template renders the prompt, and
    each answer (what is trained) with its token length. Returns how many were shown."""
    rows, _ = read_preferences(spec, objective, roles)
    for r in rows[:n]:
        print(f"--- {r.source}")
        print(encoder.prompt_text(r.prompt), end="")
        answers = [("chosen", r.chosen), ("rejected", r.rejected)] if r.rejected is not None else \
            [(f"label {str(r.label).lower()}", r.chosen)]
        for side, example in answers:
            encoded = encoder.encode(example)
            size = f"{encoded.num_trained} trained tokens" if isinstance(encoded, Encoded) else encoded.reason
            print(f"  [{side}, {size}] {example.answer}")
    return min(n, len(rows))

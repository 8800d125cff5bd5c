"""The data doctor: `llm-finetune data check` and `llm-finetune data preview`.

`check` streams a source once. Its memory is a few bytes per row, never the file: an 8-byte hash
per example in a flat array (duplicates are counted by sorting it at the end), and one counter per
distinct token length (exact quantiles without keeping every length). `preview` prints examples
exactly as the model sees them, trained tokens told apart from masked ones.
"""

from __future__ import annotations

import copy
import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..manifest import atomic_file
from .records import ReadResult, example_hash, iter_examples
from .rows import RowProblem
from .tokenize import IGNORE_INDEX, ChatEncoder, Encoded, Skipped


def exact_quantile(counts: dict[int, int], q: float) -> int:
    """The q-quantile (nearest rank) of the multiset {length: count}."""
    total = sum(counts.values())
    if not total:
        return 0
    rank = max(1, -(-int(q * total * 1_000_000) // 1_000_000))  # ceil(q * total), robust to float error
    seen = 0
    for length in sorted(counts):
        seen += counts[length]
        if seen >= rank:
            return length
    return max(counts)


@dataclass
class CheckReport:
    source: str
    max_length: int
    truncation: str
    rows: int = 0
    examples: int = 0
    problems: int = 0
    first_problems: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)  # tokens before truncation -> examples
    too_long: int = 0
    lost_all_supervision: int = 0  # nothing trained: no trained turn, or none left after truncation
    duplicates: int = 0
    ignored_files: list[str] = field(default_factory=list)
    histogram: str | None = None
    file_problems: list[str] = field(default_factory=list)  # a .json array cut part-way: shown first, once
    repairs: dict[str, int] = field(default_factory=dict)  # rows the reader repaired, by rule

    @property
    def ok(self) -> bool:
        return self.problems == 0 and self.examples > 0 and not self.file_problems

    def length_summary(self) -> dict[str, int]:
        if not self.lengths:
            return {"min": 0, "median": 0, "p95": 0, "max": 0}
        return {"min": min(self.lengths), "median": exact_quantile(self.lengths, 0.5),
                "p95": exact_quantile(self.lengths, 0.95), "max": max(self.lengths)}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "examples": self.examples, "invalid_rows": self.problems,
                "first_problems": self.first_problems, "formats": self.formats, "tokens": self.length_summary(),
                "max_length": self.max_length, "truncation": self.truncation, "too_long": self.too_long,
                "lost_all_supervision": self.lost_all_supervision, "duplicates": self.duplicates,
                "ignored_files": self.ignored_files, "histogram": self.histogram, "file_problems": self.file_problems,
                "repairs": self.repairs, "ok": self.ok}

    def format(self) -> str:
        s = self.length_summary()
        fate = "dropped" if self.truncation == "drop" else "cut from the left (answer end kept)"
        lines = [f"data check: {self.source}"]
        for problem in self.file_problems:
            lines.append(f"  FILE PROBLEM     {problem}")
            lines.append(f"                   the {self.rows} row(s) before it were read and are checked below")
        lines += [
            f"  rows read        {self.rows}",
            f"  valid examples   {self.examples}   " + ", ".join(f"{k}: {v}" for k, v in sorted(self.formats.items())),
            f"  invalid rows     {self.problems}",
            *[f"  {'repaired rows' if i == 0 else '':<17}{n} {rule}" for i, (rule, n) in
              enumerate(sorted(self.repairs.items(), key=lambda kv: -kv[1]))],
            f"  tokens/example   min {s['min']}, median {s['median']}, p95 {s['p95']}, max {s['max']} "
            f"(through the template, before truncation)",
            f"  over max_length  {self.too_long} of {self.examples} (> {self.max_length} tokens; policy "
            f"{self.truncation}: {fate})",
            f"  no trained token {self.lost_all_supervision} (would contribute no loss and are skipped)",
            f"  exact duplicates {self.duplicates}",
        ]
        for f in self.ignored_files:
            lines.append(f"  ignored file     {f} (not a supported type)")
        if self.histogram:
            lines.append(f"  histogram        {self.histogram}")
        if self.first_problems:
            lines.append(f"invalid rows ({self.problems}; first {len(self.first_problems)}):")
            lines += [f"  {p}" for p in self.first_problems]
        if self.examples == 0:
            lines.append("no valid example: nothing could be trained")
        return "\n".join(lines)


CHUNK = 256  # examples tokenised together: bounded memory, and the tokenizer's batch speed


def check(spec: str | Path, encoder: ChatEncoder, fmt: str = "auto", max_listed: int = 20,
          histogram: str | Path | None = None, roles: dict[str, str] | None = None) -> CheckReport:
    """Stream `spec` once: validate, encode each example through the real template, and count."""

    report = CheckReport(str(spec), encoder.max_length, encoder.truncation)
    # Measure as the training step would, but see the full length: truncation is applied after.
    measure = copy.copy(encoder)
    measure.truncation = "truncate_left"
    hashes = array("Q")  # 8 bytes per example
    result = ReadResult()
    chunk: list = []

    def measure_chunk() -> None:
        for example, enc in zip(chunk, measure.encode_many(chunk)):
            if isinstance(enc, Skipped) and enc.refused:  # the template cannot render it: an invalid row
                report.examples -= 1
                result.formats[example.format] -= 1
                report.problems += 1
                if len(report.first_problems) < max_listed:
                    report.first_problems.append(f"{enc.source}: {enc.reason}")
                continue
            length = enc.full_length if isinstance(enc, Encoded) else enc.length
            report.lengths[length] = report.lengths.get(length, 0) + 1
            if length > encoder.max_length:
                report.too_long += 1
            if isinstance(enc, Skipped) and (encoder.truncation == "truncate_left" or length <= encoder.max_length):
                report.lost_all_supervision += 1
        chunk.clear()

    for item in iter_examples(spec, fmt, result, roles):
        if isinstance(item, RowProblem):
            if item.scope == "file":  # counted once, in result.file_problems
                continue
            report.problems += 1
            if len(report.first_problems) < max_listed:
                report.first_problems.append(str(item))
            continue
        report.examples += 1
        hashes.append(int.from_bytes(example_hash(item), "little"))
        chunk.append(item)
        if len(chunk) == CHUNK:
            measure_chunk()
    measure_chunk()
    report.rows, report.ignored_files, report.repairs = result.rows, result.ignored_files, result.repairs
    report.formats = {k: v for k, v in result.formats.items() if v}
    report.file_problems = [str(p) for p in result.file_problems]
    if len(hashes):
        import numpy as np

        ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
        report.duplicates = int((ordered[1:] == ordered[:-1]).sum())
    if histogram and report.lengths:
        report.histogram = str(save_histogram(report.lengths, encoder.max_length, histogram, str(spec)))
    return report


def save_histogram(lengths: dict[int, int], max_length: int, path: str | Path, title: str) -> Path:
    """A PNG of the token-length distribution with max_length marked, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(sorted(lengths), dtype=np.int64)
    weights = np.array([lengths[v] for v in values.tolist()], dtype=np.int64)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(values, bins=min(60, max(1, len(values))), weights=weights, color="#4878a8")
    ax.axvline(max_length, color="#c0392b", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("tokens per example (through the chat template)")
    ax.set_ylabel("examples")
    ax.set_title(Path(title).name, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Preview

TRAINED_ON, TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"
MASKED_ON, MASKED_OFF = "\x1b[2m", "\x1b[0m"


def runs(enc: Encoded) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


def render_example(tokenizer, enc: Encoded, color: bool) -> str:
    """The example's tokens as text; trained runs coloured (terminal) or wrapped in [[ ]] (piped)."""
    parts = []
    for trained, ids in runs(enc):
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            parts.append(f"{TRAINED_ON}{text}{TRAINED_OFF}" if trained else f"{MASKED_ON}{text}{MASKED_OFF}")
        else:
            parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


def preview(spec: str | Path, encoder: ChatEncoder, n: int = 3, fmt: str = "auto", color: bool | None = None,
            out: TextIO | None = None, roles: dict[str, str] | None = None) -> int:
    """Print the first `n` valid examples as the model sees them; return how many were shown."""
    out = out or sys.stdout
    if color is None:
        color = out.isatty() and os.environ.get("NO_COLOR") is None
    legend = (f"{TRAINED_ON}trained{TRAINED_OFF} / {MASKED_ON}masked{MASKED_OFF}" if color
              else "[[trained]] / masked (no brackets)")
    out.write(f"legend: {legend}; max_length {encoder.max_length}, policy {encoder.truncation}, "
              f"train_on {encoder.train_on}\n")
    shown, problems = 0, 0
    for item in iter_examples(spec, fmt, roles=roles):
        if shown >= n:
            break
        if isinstance(item, RowProblem):
            problems += 1
            kind = "file problem" if item.scope == "file" else "invalid row, not shown"
            out.write(f"\n--- {item} ({kind})\n")
            continue
        enc = encoder.encode(item)
        shown += 1
        if isinstance(enc, Skipped):
            out.write(f"\n--- {item.source} [{item.format}] skipped: {enc.reason}\n")
            continue
        note = f", truncated from {enc.full_length}" if enc.truncated else ""
        out.write(f"\n--- {item.source} [{item.format}] {len(enc.input_ids)} tokens, {enc.num_trained} trained{note}\n")
        out.write(render_example(encoder.tokenizer, enc, color))
        out.write("\n")
    return shown


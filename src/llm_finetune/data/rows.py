"""Where rows come from: .jsonl, .json (an array), .csv, .parquet, a folder of them, or a Hub dataset.

Every reader streams and yields (file, number, unit, row-or-problem): the number is the line in a
text file and the row in a parquet file or Hub dataset, so any problem can point back to its place.
Bad bytes become problems on their row; a .json array cut part-way (or not an array at all) is one
problem of scope "file", reported once; never a silently shorter dataset.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
# CSV cells are text; these columns hold structures, written as JSON inside the cell.
JSON_COLUMNS = ("messages", "conversations", "history", "prompt", "completion")
TEXT_OR_JSON_COLUMNS = ("prompt", "completion")  # text, or (TRL's conversational form) a list of messages
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CHUNK = 1 << 20

Row = tuple[str, int, str, Any]  # (file, line or row number, "line" | "row", parsed row or RowProblem)


@dataclass
class RowProblem:
    path: str
    line: int
    reason: str
    unit: str = "line"  # "row" for files without lines (parquet, hub datasets)
    # "file" for a problem of the whole file (a .json array cut part-way): the rows before it are
    # fine and it is reported once, above the row problems, not as one of them.
    scope: str = "row"

    def __str__(self) -> str:
        where = f"{self.line}" if self.unit == "line" else f"{self.unit} {self.line}"
        return f"{self.path}:{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, self.unit: self.line, "reason": self.reason}
        return {**out, "scope": "file"} if self.scope == "file" else out


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


def _not_utf8(value: Any) -> bool:
    """True if a string decoded with surrogateescape carried bytes that are not UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_not_utf8(k) or _not_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_not_utf8(v) for v in value)
    return False


_NOT_UTF8 = "bytes that are not UTF-8; re-save the file as UTF-8"


def iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a JSON array file, each with the line it starts on.

    Parses one element at a time from a moving buffer, so memory holds one element, not the file.
    A file whose first character is '{' is read as JSON Lines (a common misnaming).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as f:
        buf, pos, line, eof = "", 0, 1, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            block = f.read(_CHUNK)
            if not block:
                eof = True
                buf += utf8.decode(b"", final=True)
                return False
            buf = buf[pos:] + utf8.decode(block)
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof or not fill():
                    return

        skip_ws()
        if pos >= len(buf):
            return  # empty file: reported as "no examples" by the caller
        if buf[pos] == "{":
            yield from iter_jsonl(path)
            return
        if buf[pos] != "[":
            yield line, RowProblem(str(path), line, f"a .json file must hold an array of rows ('[' ...), found "
                                                    f"{buf[pos]!r}; or save one object per line as .jsonl",
                                   scope="file")
            return
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos >= len(buf):
                yield line, RowProblem(str(path), line, "the JSON array is cut off part-way (no closing ']'); "
                                                        "the file is truncated, re-export it", scope="file")
                return
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    yield line, RowProblem(str(path), line, f"invalid JSON: expected ',' or ']' between rows, "
                                                            f"found {buf[pos]!r}; reading of this file stopped here")
                    return
                pos += 1
                skip_ws()
            first = False
            start_line = line
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end >= len(buf) and not eof and fill():
                        continue  # a number or literal may go on in the next block
                    break
                except json.JSONDecodeError as e:
                    if not eof and fill():
                        continue
                    if buf[pos:].strip() and not _cut_off(buf, pos):
                        bad_line = start_line + buf.count("\n", pos, e.pos)
                        yield bad_line, RowProblem(str(path), bad_line, f"invalid JSON: {e.msg}; reading of "
                                                                        "this file stopped here")
                    else:
                        yield start_line, RowProblem(
                            str(path), start_line, "the JSON array is cut off part-way (this row is incomplete "
                                                   "and there is no closing ']'); the file is truncated, re-export it",
                            scope="file")
                    return
            line += buf.count("\n", pos, end)
            pos = end
            if _not_utf8(value):
                yield start_line, RowProblem(str(path), start_line, _NOT_UTF8)
            else:
                yield start_line, value


def _cut_off(buf: str, pos: int) -> bool:
    """Whether the text from `pos` is a valid JSON prefix that merely ends early (balanced so far)."""
    depth, in_string, escape = 0, False, False
    for ch in buf[pos:]:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                return False
    return depth > 0 or in_string


def iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV file with a header; each row numbered by the line it starts on."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield 1, RowProblem(str(path), 1, f"invalid CSV header: {e}")
            return
        if _not_utf8(header):
            yield 1, RowProblem(str(path), 1, _NOT_UTF8)
            return
        end_line = reader.line_num
        while True:
            start = end_line + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, RowProblem(str(path), start, f"invalid CSV: {e}; reading of this file stopped here")
                return
            end_line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if _not_utf8(cells):
                yield start, RowProblem(str(path), start, _NOT_UTF8)
                continue
            if len(cells) != len(header):
                yield start, RowProblem(str(path), start, f"the row has {len(cells)} cells but the header has "
                                                          f"{len(header)} ({', '.join(header)})")
                continue
            row: dict[str, Any] = {}
            problem = None
            for key, cell in zip(header, cells):
                row[key] = cell
                if key in JSON_COLUMNS and cell.lstrip().startswith("["):
                    try:
                        row[key] = json.loads(cell)
                    except json.JSONDecodeError as e:
                        if key in TEXT_OR_JSON_COLUMNS:  # a prompt may simply begin with '['
                            continue
                        problem = f"column '{key}' is not valid JSON ({e.msg})"
                        break
            yield start, (RowProblem(str(path), start, problem) if problem else row)


def iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _iter_file(path: Path) -> Iterator[Row]:
    if path.suffix == ".jsonl":
        items, unit = iter_jsonl(path), "line"
    elif path.suffix == ".json":
        items, unit = iter_json_array(path), "line"
    elif path.suffix == ".csv":
        items, unit = iter_csv(path), "line"
    elif path.suffix == ".parquet":
        items, unit = iter_parquet(path), "row"
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(SUPPORTED)}")
    for number, row in items:
        if isinstance(row, RowProblem):
            row.unit = unit
        yield str(path), number, unit, row


def _hub_rows(name: str) -> Iterator[Row]:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise DataError(
            f"data file {name!r} does not exist here; as a Hugging Face Hub dataset id it needs the network, "
            "and HF_HUB_OFFLINE=1 forbids that. Where there is internet, export it once, e.g. "
            f"python -c \"import datasets; datasets.load_dataset('{name}', split='train').to_json('data.jsonl')\", "
            "then point data.train_file at the file."
        )
    try:
        import datasets

        stream = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # network, auth, or no such dataset
        raise DataError(f"data file {name!r}: not a local path, and loading it as a Hub dataset failed: {e}") from None
    for number, row in enumerate(stream, start=1):
        yield f"hf:{name}", number, "row", row


def data_files(spec: str | Path, ignored: list[str] | None = None) -> list[Path]:
    """The files behind a path: itself, or a folder's supported files (sorted, recursive)."""
    path = Path(spec)
    if path.is_dir():
        files = []
        for p in sorted(path.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                if p.suffix in SUPPORTED:
                    files.append(p)
                elif ignored is not None:
                    ignored.append(str(p))
        if not files:
            raise DataError(f"{path}: the folder has no data files ({', '.join(SUPPORTED)})")
        return files
    if path.is_file():
        if path.suffix not in SUPPORTED:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(SUPPORTED)}")
        return [path]
    raise DataError(f"data file not found: {path}")


def is_hub_name(spec: str | Path) -> bool:
    text = str(spec)
    return (not Path(text).exists() and Path(text).suffix not in SUPPORTED and _HUB_ID.match(text) is not None
            and "/" in text)


def iter_rows(spec: str | Path, ignored: list[str] | None = None) -> Iterator[Row]:
    """Every row of a file, a folder of files, or a Hub dataset, in order, streamed."""
    if is_hub_name(spec):
        yield from _hub_rows(str(spec))
        return
    for path in data_files(spec, ignored):
        yield from _iter_file(path)

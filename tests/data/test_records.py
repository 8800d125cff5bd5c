"""Reading data: every bad row is reported with its file, line and reason."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from llm_finetune.data.records import DataError, load_examples, read_examples

GOOD = '{"instruction": "Say hi", "input": "", "output": "hi"}'


@pytest.mark.parametrize("bad,reason", [
    ('{"instruction": "x", "output": }', "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"instruction": "x"}', "missing required field 'output'"),
    ('{"instruction": "", "output": "y"}', "field 'instruction' is empty"),
    ('{"instruction": 3, "output": "y"}', "'instruction' must be a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no assistant reply to a user turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "y"}]}', "messages[1]: a system message may only come first"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"foo": 1}', "unrecognised record"),
])
def test_bad_row_names_line_and_reason(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    result = read_examples(path)
    assert len(result.examples) == 3
    (problem,) = result.problems
    assert problem.line == 3 and reason in problem.reason
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert f"{path}:3:" in str(e.value) and "1 invalid row" in str(e.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1") + b"\n")
    (problem,) = read_examples(path).problems
    assert problem.line == 2 and "not UTF-8" in problem.reason


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n" + GOOD.encode() + b"\r\n")
    result = read_examples(path)
    assert not result.problems and len(result.examples) == 2
    assert result.examples[1].source.endswith(":3")


def test_many_errors_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad"] * 25)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert "25 invalid row(s)" in str(e.value) and "and 15 more" in str(e.value)


def test_chinese_rows_read_intact():
    from conftest import ROOT

    result = load_examples(ROOT / "data" / "sample_zh.jsonl")
    assert len(result.examples) == 2
    assert any("翻译" in ex.messages[0]["content"] for ex in result.examples)

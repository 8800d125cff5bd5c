"""`data check` and `data preview`: counts, exact length quantiles, duplicates, markers, exit codes."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import extraction_rows, write_jsonl

from llm_finetune.cli import main
from llm_finetune.data.doctor import check, exact_quantile, preview
from llm_finetune.data.records import read_examples
from llm_finetune.data.tokenize import ChatEncoder, Encoded

ROWS = extraction_rows(5) + [
    {"messages": [{"role": "user", "content": "Extract name, age and city as JSON.\n\nAna Silva, 20, lives in Lisbon."},
                  {"role": "assistant", "content": json.dumps({"name": "Ana Silva", "age": 20, "city": "Lisbon"})}]},
    {"conversations": [{"from": "human", "value": "机器学习是什么？"}, {"from": "gpt", "value": "人工智能的一个分支。"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]},
    {"prompt": "word " * 200, "completion": "end"},
    {"text": "Привет, как дела?"},
    extraction_rows(1)[0],
]


@pytest.mark.parametrize("q", [0.0, 0.01, 0.5, 0.95, 0.999, 1.0])
def test_exact_quantile_is_nearest_rank(q):
    rng = random.Random(int(q * 1000))
    values = [rng.randint(1, 40) for _ in range(997)]
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    ordered = sorted(values)
    assert exact_quantile(counts, q) == ordered[max(1, math.ceil(q * len(values))) - 1]


def test_check_counts_everything(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + ['{"instruction": 1, "output": "x"}', "not json"])
    encoder = ChatEncoder(chatml_tokenizer, max_length=128)
    report = check(path, encoder, histogram=tmp_path / "h.png")
    assert report.rows == 13 and report.examples == 11 and report.problems == 2
    assert report.first_problems == [f"{path}:12: field 'instruction' must be a string, got int",
                                     f"{path}:13: invalid JSON at column 1: Expecting value"]
    assert report.formats == {"alpaca": 6, "messages": 2, "sharegpt": 1, "prompt_completion": 1, "text": 1}
    # Lengths are the real template's, before truncation: the same numbers training computes.
    full = ChatEncoder(chatml_tokenizer, max_length=10_000)
    expected = []
    for ex in read_examples(path).examples:
        enc = full.encode(ex)
        expected.append(enc.full_length if isinstance(enc, Encoded) else enc.length)
    assert sum(report.lengths.values()) == 11
    assert sorted(k for k, v in report.lengths.items() for _ in range(v)) == sorted(expected)
    summary = report.length_summary()
    assert summary["min"] == min(expected) and summary["max"] == max(expected)
    assert summary["median"] == sorted(expected)[math.ceil(0.5 * 11) - 1]
    assert report.too_long == 1  # the 200-word prompt
    assert report.lost_all_supervision == 1  # the reply marked train: false
    assert report.duplicates == 2  # row 11 repeats row 1; row 6 is row 1's conversation as messages
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.ok and "invalid rows (2; first 2)" in report.format()


def test_truncate_left_policy_counts_and_does_not_lose_supervision(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    report = check(path, ChatEncoder(chatml_tokenizer, max_length=128, truncation="truncate_left"))
    assert report.too_long == 1 and report.lost_all_supervision == 1 and report.ok
    assert "policy truncate_left: cut from the left" in report.format()


def test_cli_check_exit_codes_and_json(tmp_path, tiny_model_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS + ['{"messages": [{"role": "user", "content": "x"}]}'])
    model = f"model.name_or_path={tiny_model_dir}"
    png = tmp_path / "plots" / "len.png"
    assert main(["data", "check", str(good), "--set", model, "--set", "data.max_length=128", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "valid examples   11" in out and "exact duplicates 2" in out and png.is_file()
    assert main(["data", "check", str(bad), "--set", model, "--no-plot", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["invalid_rows"] == 1 and report["first_problems"] == [f"{bad}:12: the conversation has no "
                                                                        "assistant turn, so nothing would be trained"]
    assert main(["data", "check", str(tmp_path / "missing.jsonl"), "--set", model, "--no-plot"]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["data"]) == 2


def test_preview_marks_trained_tokens_when_piped(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[6:8] + ROWS[9:10])
    assert main(["data", "preview", str(path), "-n", "2", "--set", f"model.name_or_path={tiny_model_dir}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert "<|im_start|>user\n机器学习是什么？<|im_end|>\n<|im_start|>assistant\n[[人工智能的一个分支。<|im_end|>]]" in out
    assert f"--- {path}:2 [messages] skipped: no supervised tokens" in out
    assert "Привет" not in out  # -n 2: the third example is not shown


def test_preview_colours_on_a_terminal(tmp_path, chatml_tokenizer):
    import io

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Привет"}])
    out = io.StringIO()
    assert preview(path, ChatEncoder(chatml_tokenizer), n=1, color=True, out=out) == 1
    text = out.getvalue()
    assert "\x1b[1;32mПривет<|im_end|>\x1b[0m" in text and "[[" not in text

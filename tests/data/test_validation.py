"""Bad input of every kind is reported with file, line and reason, and the run writes nothing.

Also: the accepted oddities (BOM, CRLF, blank lines), every file type, folders, the Hub offline
error, `data.on_error: skip` with its rejects file, weights, eval fraction, de-duplication.
"""

from __future__ import annotations

import json

import pytest
from conftest import extraction_rows, write_jsonl

from llm_finetune.config import load_config
from llm_finetune.data.records import DataError, read_examples

GOOD = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FINETUNE_CACHE", str(tmp_path / "cache"))


def run_config(tmp_path, model_dir, train_file, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_file={train_file}",
                              "data.eval_file=null", f"output.dir={tmp_path / 'ck'}",
                              f"output.logs_dir={tmp_path / 'logs'}", "train.max_steps=2", "train.batch_size=4",
                              *extra])


JSONL_CASES = [
    ('{"instruction": "x", "output": }', "invalid JSON at column"),
    ('["a", "b"]', "each row must be a JSON object, got list"),
    ('{"instruction": "x"}', "missing required field 'output'"),
    ('{"instruction": "   ", "output": "y"}', "field 'instruction' is empty"),
    ('{"instruction": ["x"], "output": "y"}', "field 'instruction' must be a string, got list"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
     '{"role": "system", "content": "z"}]}', "a system message may only come first"),
    ('{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}', "no assistant turn"),
    ('{"conversations": [{"from": "human", "value": "x"}, {"from": "alien", "value": "y"}]}',
     "unknown role 'alien'"),
]


@pytest.mark.parametrize("bad,reason", JSONL_CASES, ids=[r.split()[0] + "-" + str(i) for i, (_, r) in
                                                          enumerate(JSONL_CASES)])
def test_bad_jsonl_row_stops_the_run_before_anything_is_written(tmp_path, tiny_model_dir, bad, reason):
    from llm_finetune.train import run

    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        run(run_config(tmp_path, tiny_model_dir, path))
    message = str(e.value)
    assert f"{path}:3: " in message and reason in message and "1 invalid row(s)" in message
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_bytes_that_are_not_utf8(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    path = tmp_path / "train.jsonl"
    path.write_bytes(((GOOD + "\n") * 4).encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:5: bytes that are not UTF-8"):
        run(run_config(tmp_path, tiny_model_dir, path))
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_json_array_cut_off_part_way(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    path = tmp_path / "train.json"
    path.write_text("[\n" + ",\n".join([GOOD] * 3) + ',\n{"instruction": "half a ro', encoding="utf-8")
    with pytest.raises(DataError) as e:
        run(run_config(tmp_path, tiny_model_dir, path))
    message = str(e.value)
    assert f"{path}:5: the JSON array is cut off part-way" in message and "truncated" in message
    assert "1 file problem(s)" in message and "invalid row" not in message  # a file problem, not a row one
    assert "The 3 row(s) before the cut were read" in message and "data.on_error=skip" in message
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()
    # Cut between rows, and with no closing bracket at all: still named, once, as the file's problem.
    path.write_text("[\n" + ",\n".join([GOOD] * 3) + ",\n", encoding="utf-8")
    result = read_examples(path)
    (problem,) = result.file_problems
    assert problem.line == 5 and "cut off" in problem.reason and problem.scope == "file"
    assert not result.problems and len(result.examples) == 3 and result.rows == 3


def test_json_array_rows_lines_and_bad_utf8(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf[\r\n" + GOOD.encode() + b",\r\n\r\n" + GOOD.encode() + b",\n"
                     + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1") + b",\n" + GOOD.encode() + b"]\n")
    result = read_examples(path)
    assert [e.source for e in result.examples] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    (problem,) = result.problems
    assert problem.line == 5 and "not UTF-8" in problem.reason


def test_json_array_invalid_element(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(f"[{GOOD},\n{GOOD},\n" + '{"instruction": "x", "output": }\n]', encoding="utf-8")
    result = read_examples(path)
    assert len(result.examples) == 2
    (problem,) = result.problems
    assert problem.line == 3 and "invalid JSON" in problem.reason


def test_bom_crlf_blank_lines_accepted_everywhere(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n\r\n" + GOOD.encode() + b"\r\n")
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"\xef\xbb\xbfinstruction,input,output\r\nSay hi,,hi\r\n\r\n\"two\r\nlines\",,ok\r\n")
    for path in (jsonl, csv):
        result = read_examples(path)
        assert not result.problems and len(result.examples) == 2, path
    assert read_examples(csv).examples[1].source == f"{csv}:4"
    assert read_examples(csv).examples[1].messages[0]["content"] == "two\r\nlines"


def test_csv_problems_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output,history\nhi,there,\nonly one cell\nq,a,"[[""x"", ""y""]]"\n'
                    'q,a,"[not json"\n,a,\n', encoding="utf-8")
    result = read_examples(path)
    assert [e.source for e in result.examples] == [f"{path}:2", f"{path}:4"]
    assert len(result.examples[1].messages) == 4  # history parsed from the JSON cell
    assert [(p.line, p.reason.split(";")[0]) for p in result.problems] == [
        (3, "the row has 1 cells but the header has 3 (instruction, output, history)"),
        (5, "column 'history' is not valid JSON (Expecting value)"),
        (6, "field 'instruction' is empty"),
    ]


def test_csv_prompt_completion_text_that_looks_like_json(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"{""name"": 1} as YAML?","name: 1"\n"[INST] hi","hello"\n'
                    '"[{""role"": ""user"", ""content"": ""q""}]","[{""role"": ""assistant"", ""content"": ""a""}]"\n',
                    encoding="utf-8")
    result = read_examples(path)
    assert not result.problems
    assert [e.messages[0]["content"] for e in result.examples] == ['{"name": 1} as YAML?', "[INST] hi", "q"]


def test_parquet_rows_are_numbered(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}, {"prompt": "e", "completion": "f"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = read_examples(path)
    assert [e.source for e in result.examples] == [f"{path}:row 1", f"{path}:row 3"]
    (problem,) = result.problems
    assert str(problem) == f"{path}:row 2: field 'completion' is empty"


def test_folder_reads_every_file_and_reports_ignored_ones(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", [GOOD])
    (folder / "sub").mkdir()
    (folder / "sub" / "b.json").write_text(f"[{GOOD}, {GOOD}]")
    (folder / "README.md").write_text("notes")
    (folder / ".hidden.jsonl").write_text("{bad")
    result = read_examples(folder)
    assert len(result.examples) == 3 and not result.problems
    assert result.ignored_files == [str(folder / "README.md")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder has no data files"):
        read_examples(tmp_path / "empty")


def test_missing_file_unsupported_type_and_hub_name_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="data file not found"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_examples(tmp_path / "d.txt")
    with pytest.raises(DataError, match="Hub dataset id.*HF_HUB_OFFLINE=1"):
        read_examples("tatsu-lab/alpaca")


# ---------------------------------------------------------------------------------------------
# Splits, weights, de-duplication: prepare_data without training.


def prepare(tmp_path, tokenizer, *overrides):
    from llm_finetune.data.prepare import prepare_data

    cfg = load_config(None, ["data.eval_file=null", "data.max_length=128", *overrides])
    return prepare_data(cfg, tokenizer)


def test_weights_eval_fraction_and_dedup_are_recorded(tmp_path, chatml_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", extraction_rows(20) + extraction_rows(4))  # 4 exact duplicates
    b = write_jsonl(tmp_path / "b.jsonl", extraction_rows(10, offset=50))
    files = json.dumps([str(a), str(b)])
    data = prepare(tmp_path, chatml_tokenizer, f"data.train_file={files}", "data.train_weights=[1, 2]",
                   "data.dedup=true", "data.eval_fraction=0.1", "data.shuffle_seed=7")
    info = data.info
    assert info["dedup"] == {"enabled": True, "removed": 4}
    assert info["split"]["eval_source"] == "fraction" and info["split"]["eval_examples"] == 3  # 10% of 30
    held_out = {tuple(e.input_ids) for e in data.eval}
    assert not held_out & {tuple(e.input_ids) for e in data.train}  # no leak into training
    from_a = sum(1 for e in data.train if "a.jsonl" in e.source)
    from_b = sum(1 for e in data.train if "b.jsonl" in e.source)
    held_a = sum(1 for e in data.eval if "a.jsonl" in e.source)
    assert from_a == 20 - held_a and from_b == 2 * (10 - (3 - held_a))  # b counted twice
    assert info["weights"] == {str(a): 1.0, str(b): 2.0}
    assert [r["stage"] for r in data.rejects] == ["dedup"] * 4
    again = prepare(tmp_path, chatml_tokenizer, f"data.train_file={files}", "data.train_weights=[1, 2]",
                    "data.dedup=true", "data.eval_fraction=0.1", "data.shuffle_seed=7")
    assert [e.source for e in again.train] == [e.source for e in data.train]  # seeded
    other = prepare(tmp_path, chatml_tokenizer, f"data.train_file={files}", "data.train_weights=[1, 2]",
                    "data.dedup=true", "data.eval_fraction=0.1", "data.shuffle_seed=8")
    assert [e.source for e in other.train] != [e.source for e in data.train]


def test_fractional_weight_takes_a_seeded_part(tmp_path, chatml_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", extraction_rows(20))
    data = prepare(tmp_path, chatml_tokenizer, f"data.train_file={json.dumps([str(a)])}", "data.train_weights=[0.5]")
    assert len(data.train) == 10 and len({e.source for e in data.train}) == 10


@pytest.mark.parametrize("overrides,message", [
    (["data.train_weights=[1, 2]"], "data.train_weights has 2 entries but data.train_file has 1"),
    (["data.train_weights=[0]"], "every weight must be above 0"),
    (["data.eval_fraction=0.2", "data.eval_file=data/eval.jsonl"], "choose one: set data.eval_file=null"),
])
def test_split_options_conflicts(tmp_path, chatml_tokenizer, overrides, message):
    """Rules between data keys are the config's: refused when it loads, before any data is read."""
    from llm_finetune.config import ConfigError

    a = write_jsonl(tmp_path / "a.jsonl", extraction_rows(5))
    with pytest.raises(ConfigError, match=message):
        prepare(tmp_path, chatml_tokenizer, f"data.train_file={a}", *overrides)


def test_prompt_longer_than_max_length_is_reported_never_trained_with_zero_labels(tmp_path, chatml_tokenizer):
    rows = extraction_rows(6) + [{"instruction": "word " * 300, "input": "", "output": "ok"}]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    for policy in ("drop", "truncate_left"):
        data = prepare(tmp_path, chatml_tokenizer, f"data.train_file={a}", f"data.truncation={policy}",
                       "data.max_length=128")
        assert all(e.num_trained > 0 for e in data.train)
        if policy == "drop":
            (reject,) = data.rejects
            assert reject["source"] == f"{a}:7" and "tokens > data.max_length=128" in reject["reason"]
            assert data.train_stats.kept == 6
        else:
            assert data.train_stats.truncated == 1 and data.train_stats.kept == 7


def test_eval_rows_that_cannot_be_used_are_reported(tmp_path, chatml_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", extraction_rows(6))
    e = write_jsonl(tmp_path / "e.jsonl", extraction_rows(2, offset=60) + [{"instruction": "w " * 300, "output": "x"}])
    data = prepare(tmp_path, chatml_tokenizer, f"data.train_file={a}", f"data.eval_file={e}")
    assert len(data.eval) == 2 and data.info["split"]["eval_skipped"] == 1
    assert data.rejects == [{"source": f"{e}:3", "reason": data.rejects[0]["reason"], "stage": "eval"}]
    assert "data.max_length=128" in data.rejects[0]["reason"]


# ---------------------------------------------------------------------------------------------
# on_error: skip trains on the valid rows and writes the rejects next to the logs.


def test_on_error_skip_trains_and_writes_rejects(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    path = write_jsonl(tmp_path / "train.jsonl", extraction_rows(8) + ['{"instruction": "x"', '[1]']
                       + [{"instruction": "a", "output": "b"}] * 2)
    cfg = run_config(tmp_path, tiny_model_dir, path, "data.on_error=skip", "data.dedup=true",
                     "eval.compare_base=false")
    result = run(cfg)
    rejects = [json.loads(line) for line in (tmp_path / "logs" / "rejected_rows.jsonl").read_text().splitlines()]
    assert [(r.get("line"), r["stage"]) for r in rejects] == [(9, "read"), (10, "read"), (None, "dedup")]
    assert "invalid JSON" in rejects[0]["reason"] and "must be a JSON object" in rejects[1]["reason"]
    log = (tmp_path / "logs" / "training.log").read_text()
    assert "3 row(s) not used" in log and "rejected_rows.jsonl" in log
    data = result.manifest["data"]
    assert data["invalid_rows"] == 2 and data["dedup"]["removed"] == 1 and data["on_error"] == "skip"
    assert data["formats"] == {"alpaca": 10} and data["split"]["train_examples"] == 9
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_json_file_holding_json_lines_or_a_scalar(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text(f"{GOOD}\n{GOOD}\n", encoding="utf-8")
    assert [e.source for e in read_examples(lines).examples] == [f"{lines}:1", f"{lines}:2"]
    scalar = tmp_path / "scalar.json"
    scalar.write_text('\n"just a string"\n', encoding="utf-8")
    (problem,) = read_examples(scalar).file_problems
    assert problem.line == 2 and "must hold an array of rows" in problem.reason

"""The leak check compares the eval set with the examples actually trained, never costs the adapter,
and `llm-finetune eval` re-derives the same trained set from the adapter's run_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import extraction_rows, write_jsonl

from llm_finetune.config import load_config
from llm_finetune.data.records import Example
from llm_finetune.evaluation.leakage import TrainIndex, find_leaks


def _settings(root: Path, model_dir: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "data.max_length=128", "method.dropout=0.1",
            "train.learning_rate=0.01", "train.max_steps=2", "train.batch_size=4", "train.warmup_ratio=0.0",
            "train.seed=0", "eval.max_new_tokens=4", "eval.batch_size=8", "eval.compare_base=false",
            "output.tensorboard=false", f"output.dir={root / 'checkpoints'}", f"output.logs_dir={root / 'logs'}",
            *extra]


def _text(content: str, source: str) -> Example:
    return Example([{"role": "text", "content": content}], source, "text")


def _chat(q: str, a: str, source: str) -> Example:
    return Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], source, "alpaca")


def test_text_rows_are_never_a_prompt_leak():
    """A text row has no prompt: two different text rows do not share one (they used to, all of them)."""
    train = [_text("The cat sat on the mat.", "train.jsonl:1"), _chat("2+2?", "4", "train.jsonl:2")]
    held_out = [_text("A different paragraph entirely.", "eval.jsonl:1"),
                _text("The cat sat on the mat.", "eval.jsonl:2"),   # a real copy: exact, not a prompt match
                _chat("2+2?", "four", "eval.jsonl:3")]              # same prompt, other answer
    leaks = find_leaks(held_out, TrainIndex.build(train))
    assert (leaks["exact"]["count"], leaks["normalized"]["count"], leaks["prompt"]["count"]) == (1, 1, 1)
    assert leaks["leaked"] == 2 and leaks["train_examples"] == 2
    assert [(h["eval"], h["match"]) for h in leaks["listed"]] == [("eval.jsonl:2", "exact"),
                                                                  ("eval.jsonl:3", "prompt")]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_model_dir):
    """Two train files (a list), on_error: skip with one broken JSONL line, an eval file with one row
    copied from the second train file: trains, reports and writes its adapter."""
    from llm_finetune.train import run

    root = tmp_path_factory.mktemp("leaks")
    rows_a, rows_b = extraction_rows(10), extraction_rows(10, offset=10)
    write_jsonl(root / "a.jsonl", rows_a[:4] + ['{"instruction": "broken line", '] + rows_a[4:])
    write_jsonl(root / "b.jsonl", rows_b)
    write_jsonl(root / "eval.jsonl", extraction_rows(5, offset=40) + [rows_b[3]])
    cfg = load_config(None, _settings(root, tiny_model_dir, "data.on_error=skip",
                                      f"data.eval_file={root / 'eval.jsonl'}")
                      + [f"data.train_file={json.dumps([str(root / 'a.jsonl'), str(root / 'b.jsonl')])}"])
    return root, run(cfg)


def test_list_of_files_with_a_skipped_row_trains_reports_and_finds_the_copy(mixed_run):
    root, result = mixed_run
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.manifest["data"]["invalid_rows"] == 1
    leaks = json.loads((root / "checkpoints" / "report.json").read_text())["leaks"]
    assert leaks["train_examples"] == 20 and leaks["eval_examples"] == 6
    assert (leaks["exact"]["count"], leaks["normalized"]["count"], leaks["prompt"]["count"], leaks["leaked"]) == \
        (1, 1, 1, 1)
    assert leaks["listed"] == [{"eval": f"{root / 'eval.jsonl'}:6", "train": f"{root / 'b.jsonl'}:4",
                                "match": "exact"}]
    # The results went into the saved adapter folder, its manifest included.
    saved = json.loads((result.adapter_dir / "eval_report.json").read_text())
    assert saved["leaks"]["exact"]["count"] == 1
    manifest = json.loads((result.adapter_dir / "run_manifest.json").read_text())
    assert manifest["evaluation"]["leaks"]["leaked"] == 1
    assert (result.adapter_dir / "eval_report.md").read_text().startswith("| metric |")


def test_eval_rederives_the_trained_set_and_says_when_the_data_changed_or_is_gone(mixed_run, tmp_path):
    from llm_finetune.cli import main

    root, result = mixed_run
    trained = json.loads((root / "checkpoints" / "report.json").read_text())["leaks"]

    def evaluate(out: Path) -> dict:
        assert main(["eval", "--adapter", str(result.adapter_dir), "--out", str(out)]) == 0
        return json.loads((out / "report.json").read_text())

    again = evaluate(tmp_path / "same")["leaks"]
    assert {k: again[k] for k in ("exact", "normalized", "prompt", "leaked", "listed", "train_examples")} == \
        {k: trained[k] for k in ("exact", "normalized", "prompt", "leaked", "listed", "train_examples")}
    assert "note" not in again

    b = root / "b.jsonl"
    original = b.read_text()
    try:
        b.write_text(original + json.dumps(extraction_rows(1, offset=30)[0]) + "\n")
        changed = evaluate(tmp_path / "changed")["leaks"]
        assert "changed since the run" in changed["note"] and str(b) in changed["note"]
        assert changed["train_examples"] == 21
        b.unlink()
        gone = evaluate(tmp_path / "gone")
        assert "leaks" not in gone and "training data is gone" in gone["meta"]["leak_check"]
        assert "leak check not run: the run's training data is gone" in (tmp_path / "gone" / "report.md").read_text()
    finally:
        b.write_text(original)


def test_eval_fraction_held_out_rows_are_not_leaks(tmp_path, tiny_model_dir):
    """The held-out rows come out of the train file, but were not trained: 0 leaks on distinct rows."""
    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(30))
    cfg = load_config(None, _settings(tmp_path, tiny_model_dir, f"data.train_file={tmp_path / 'train.jsonl'}",
                                      "data.eval_file=null", "data.eval_fraction=0.2"))
    report = run(cfg).report
    assert report["leaks"]["eval_examples"] == 6 and report["leaks"]["train_examples"] == 24
    assert report["leaks"]["leaked"] == 0 and report["leaks"]["prompt"]["count"] == 0


def test_the_adapter_is_saved_before_evaluation_can_fail(tmp_path, tiny_model_dir, monkeypatch):
    import llm_finetune.train as train

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(2, offset=20))

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(train, "compare_base_and_tuned", broken)
    cfg = load_config(None, _settings(tmp_path, tiny_model_dir, f"data.train_file={tmp_path / 'train.jsonl'}",
                                      f"data.eval_file={tmp_path / 'eval.jsonl'}"))
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train.run(cfg)
    adapter = tmp_path / "checkpoints" / "adapter_model"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "run_config.json").is_file()
    assert json.loads((adapter / "run_manifest.json").read_text())["training"]["steps"] == 2
    assert "the trained adapter is saved in" in (tmp_path / "logs" / "training.log").read_text()

"""The evaluation report end to end on the tiny model: files, numbers, direction, in-training eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, extraction_rows, write_jsonl

from llm_finetune.config import ConfigError, load_config
from llm_finetune.evaluation.metrics import FormatChecker, chrf, exact_match, normalized_match, rouge_l

SCHEMA = {"type": "object", "required": ["name", "age", "city"], "properties": {"age": {"type": "integer"}}}
REGRESSION = [{"instruction": "What is the capital of France?", "output": "Paris"},
              {"instruction": "How many days are in a week?", "output": "7"},
              {"instruction": "What colour is the sky on a clear day?", "output": "Blue"}]


def _overrides(root: Path, model_dir: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}",
            f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "method.dropout=0.0",
            "method.alpha=16", "train.learning_rate=0.01", "train.max_steps=12", "train.logging_steps=2",
            "train.warmup_ratio=0.0", "train.seed=0", "eval.max_new_tokens=16", "eval.batch_size=8",
            f"output.dir={root / 'checkpoints'}", f"output.logs_dir={root / 'logs'}", *extra]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_model_dir):
    """A few overfitting steps: the held-out file is the training data itself (so the leak check must
    flag every row), eval loss every 4 steps, a JSON-schema format check and a regression set."""
    from llm_finetune.train import run

    root = tmp_path_factory.mktemp("overfit")
    rows = extraction_rows(8)
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "eval.jsonl", rows)
    write_jsonl(root / "regression.jsonl", REGRESSION)
    cfg = load_config(None, _overrides(root, tiny_model_dir, "train.batch_size=4", "train.eval_steps=4",
                                       "eval.format=json_schema", f"eval.schema={json.dumps(SCHEMA)}",
                                       "eval.consistency_samples=2", f"eval.regression_file={root / 'regression.jsonl'}"))
    return root, cfg, run(cfg)


def test_report_files_exist(overfit):
    root, _, result = overfit
    out = root / "checkpoints"
    for name in ("report.md", "report.json", "plots/loss_curves.png", "plots/metrics.png",
                 "plots/answer_lengths.png"):
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for section in ("## Metrics", "## Leak check", "## Regression set", "## Examples that changed most",
                    "plots/metrics.png"):
        assert section in md
    # The table travels with the adapter, for the model card.
    card = (result.adapter_dir / "eval_report.md").read_text()
    assert card.startswith("| metric | base | tuned |") and "chrF" in card


def test_report_numbers_match_metrics_computed_directly(overfit):
    root, _, result = overfit
    report = json.loads((root / "checkpoints" / "report.json").read_text())
    examples = report["examples"]
    refs = [ex["reference"] for ex in examples]
    check = FormatChecker("json_schema", schema=SCHEMA)
    for side in ("base", "tuned"):
        preds = [ex[side]["prediction"] for ex in examples]
        m = report[side]["metrics"]
        n = len(preds)
        assert m["exact_match"]["value"] == sum(map(exact_match, preds, refs)) / n
        assert m["exact_match"]["k"] == sum(map(exact_match, preds, refs)) and m["exact_match"]["n"] == n
        assert m["normalized_match"]["value"] == sum(map(normalized_match, preds, refs)) / n
        assert m["chrf"]["value"] == pytest.approx(sum(map(chrf, preds, refs)) / n)
        assert m["rougeL"]["value"] == pytest.approx(sum(map(rouge_l, preds, refs)) / n)
        assert m["format"]["value"] == sum(map(check, preds)) / n
        assert m["stop_rate"]["value"] == sum(ex[side]["stopped"] for ex in examples) / n
        assert m["answer_tokens"]["value"] == pytest.approx(sum(ex[side]["tokens"] for ex in examples) / n)
        assert report[side]["length"]["tokens"]["max"] == max(ex[side]["tokens"] for ex in examples)
        lo, hi = m["chrf"]["ci95"]
        assert lo <= m["chrf"]["value"] <= hi
        assert m["consistency"]["n"] == n and 0 < m["consistency"]["value"] <= 1
    diff = report["difference"]["metrics"]["chrf"]
    assert diff["value"] == pytest.approx(report["tuned"]["metrics"]["chrf"]["value"]
                                          - report["base"]["metrics"]["chrf"]["value"])
    # The markdown shows the same numbers as the JSON.
    md = (root / "checkpoints" / "report.md").read_text()
    assert f"{report['tuned']['eval_loss']:.3f}" in md
    assert f"{report['tuned']['metrics']['chrf']['value']:.1%}" in md


def test_report_loss_matches_a_fresh_evaluation(overfit, tiny_model_dir):
    """Reload base + adapter from disk and compute the token-weighted loss directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.data.records import load_examples
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.score import eval_loss

    root, _, result = overfit
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    encoder = ChatEncoder(tok, 128)
    encoded = [encoder.encode(ex) for ex in load_examples(root / "eval.jsonl").examples]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    assert eval_loss(model, encoded, tok.pad_token_id)["loss"] == pytest.approx(result.report["tuned"]["eval_loss"],
                                                                                 rel=1e-5)
    with model.disable_adapter():
        assert eval_loss(model, encoded, tok.pad_token_id)["loss"] == pytest.approx(
            result.report["base"]["eval_loss"], rel=1e-5)


def test_overfitting_moves_the_numbers_the_expected_way(overfit):
    _, _, result = overfit
    r = result.report
    loss = r["difference"]["metrics"]["eval_loss"]
    assert loss["value"] < 0 and loss["ci95"][1] < 0  # lower loss on the data it was trained on, clearly
    assert r["difference"]["metrics"]["chrf"]["value"] > 0  # answers look more like the references
    assert r["tuned"]["metrics"]["chrf"]["value"] > r["base"]["metrics"]["chrf"]["value"]
    assert r["changed"]["improved"], "some example must have improved"
    # The eval file is the training file: every row is a leak, and named.
    assert r["leaks"]["exact"]["count"] == r["tuned"]["n"] == 8
    assert r["leaks"]["listed"][0]["match"] == "exact" and r["leaks"]["listed"][0]["eval"].endswith("eval.jsonl:1")
    # The regression set was scored for both models.
    assert r["regression"]["tuned"]["n"] == 3 and "eval_loss" in r["regression"]["difference"]


def test_eval_loss_every_n_steps_tensorboard_and_best_checkpoint(overfit):
    root, _, result = overfit
    records = [json.loads(line) for line in (root / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [4, 8, 12]
    events = list((root / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "eval/loss"} <= set(acc.Tags()["scalars"])
    best = json.loads((root / "checkpoints" / "best_checkpoint.json").read_text())
    best_step = min(evals, key=evals.get)
    assert best["step"] == best_step and best["checkpoint"] == f"checkpoint-{best_step}"
    assert (root / "checkpoints" / best["checkpoint"]).is_dir()
    assert result.manifest["best_checkpoint"]["checkpoint"] == best["checkpoint"]
    # In-training eval loss is the same token-weighted quantity as the report's: the final adapter is the
    # best checkpoint, and its reported loss equals the loss logged at that step.
    assert result.report["tuned"]["eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)


def test_report_says_when_the_best_checkpoint_was_chosen_on_the_reported_set(overfit, tmp_path):
    """train.eval_steps + load_best_at_end pick the adapter on the eval set the report scores: optimistic."""
    from llm_finetune.evaluation.report import add_context

    root, cfg, result = overfit
    meta = json.loads((root / "checkpoints" / "report.json").read_text())["meta"]
    assert meta["optimistic"] is True and meta["best_checkpoint"] == result.manifest["best_checkpoint"]["checkpoint"]
    assert "best of 3 checkpoints by eval loss on this same eval set" in meta["best_checkpoint_selection"]
    md = (root / "checkpoints" / "report.md").read_text()
    assert "> **Note:** optimistic: the adapter is the best of 3 checkpoints" in md.split("## Metrics")[0]
    # A last-step adapter (load_best_at_end=false), or a choice made on another set, is not flagged.
    best = dict(result.manifest["best_checkpoint"], final_adapter_is_best=False)
    assert add_context({}, cfg, [], best=best)["meta"]["optimistic"] is False
    assert "best_checkpoint_selection" not in add_context({}, cfg, [], best=result.manifest["best_checkpoint"],
                                                          best_on_same_set=False)["meta"]


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(4, offset=50))
    # An improvement threshold no step can beat: the first evaluation sets the best, the second runs out of
    # patience, so training stops at step 4 of 12.
    cfg = load_config(None, _overrides(tmp_path, tiny_model_dir, "train.batch_size=4", "train.eval_steps=2",
                                       "train.early_stopping_patience=1", "train.early_stopping_threshold=100",
                                       "eval.compare_base=false", "eval.report=false", "output.tensorboard=false"))
    result = run(cfg)
    assert result.manifest["training"]["steps"] == 4
    best = result.manifest["best_checkpoint"]
    evals = {e["step"]: e["eval_loss"] for e in best["evaluations"]}
    assert sorted(evals) == [2, 4] and best["stopped_early"]
    lowest = min(evals, key=evals.get)  # the best is the lowest eval loss (the threshold only governs stopping)
    assert best["checkpoint"] == f"checkpoint-{lowest}" and best["eval_loss"] == evals[lowest]
    assert json.loads((tmp_path / "checkpoints" / "best_checkpoint.json").read_text())["step"] == lowest
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    at_best = load_file(tmp_path / "checkpoints" / best["checkpoint"] / "adapter_model.safetensors")
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert not (tmp_path / "logs" / "tensorboard").exists()


def test_eval_cli_base_vs_adapter_and_two_adapters(overfit, tmp_path, capsys):
    from llm_finetune.cli import main

    root, _, result = overfit
    adapter = str(result.adapter_dir)
    out = tmp_path / "eval1"
    # No --config: the adapter's run_config.json supplies model, eval file and metric settings.
    assert main(["eval", "--adapter", adapter, "--out", str(out), "--set", "eval.consistency_samples=0"]) == 0
    printed = capsys.readouterr().out
    assert "base vs tuned" in printed and "eval loss" in printed and "leak check" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["tuned"]["eval_loss"] == pytest.approx(result.report["tuned"]["eval_loss"], rel=1e-5)
    assert report["tuned"]["metrics"]["chrf"]["value"] == pytest.approx(result.report["tuned"]["metrics"]["chrf"]["value"])
    assert (out / "report.md").is_file() and (out / "plots" / "metrics.png").is_file()
    # The adapter is the best checkpoint by eval loss on this same file: `eval` says so too.
    assert report["meta"]["optimistic"] is True and "optimistic" in report["meta"]["best_checkpoint_selection"]
    assert "note: optimistic" in printed
    # The same adapter against itself: every difference is exactly zero.
    out2 = tmp_path / "eval2"
    assert main(["eval", "--adapter", adapter, "--against", adapter, "--out", str(out2),
                 "--set", "eval.consistency_samples=0", "--set", "eval.regression_file=null"]) == 0
    same = json.loads((out2 / "report.json").read_text())
    assert same["order"] == ["A", "B"]
    for d in same["difference"]["metrics"].values():
        assert d["value"] == 0 and d["ci95"] == [0.0, 0.0]


def test_eval_cli_errors_name_the_fix(tmp_path, capsys):
    from llm_finetune.cli import main

    assert main(["eval", "--adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope: not an adapter folder" in err and "Traceback" not in err
    assert main(["eval", "--adapter", "a", "--adapter", "b", "--adapter", "c"]) == 2
    assert "at most two" in capsys.readouterr().err


def test_bad_eval_settings_fail_before_anything_is_written(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(4))
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(2, offset=9))
    cases = [(["train.early_stopping_patience=2"], "needs train.eval_steps"),
             (["eval.format=json_schema"], "eval.schema is not set"),
             (["eval.format=regex", "eval.regex=[a-"], "eval.regex: invalid regular expression"),
             (["eval.format=json_schema", "eval.schema={\"type\": 5}"], "not a valid JSON Schema"),
             (["train.eval_steps=4", "train.save_steps=6"], "multiple of train.eval_steps")]
    for extra, message in cases:  # rules between keys at load time, the schema and regex themselves before training
        with pytest.raises(ConfigError, match=message):
            run(load_config(None, _overrides(tmp_path, tiny_model_dir, *extra)))
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()


def test_shipped_regression_set_and_schema_are_valid():
    from llm_finetune.data.records import load_examples
    from llm_finetune.evaluation.score import load_schema

    rows = load_examples(ROOT / "data" / "regression.jsonl").examples
    assert len(rows) >= 20 and all(ex.answer.strip() for ex in rows)
    schema = load_schema(str(ROOT / "data" / "extraction.schema.json"))
    check = FormatChecker("json_schema", schema=schema)
    train = load_examples(ROOT / "data" / "train.jsonl").examples
    assert all(check(ex.answer) for ex in train[:50])  # the shipped answers satisfy the shipped schema


def test_report_for_one_model_only(overfit, tmp_path):
    """eval.compare_base=false leaves one side: the report has no difference column but is complete."""
    from llm_finetune.evaluation.report import summary_table, write_report

    root, _, _ = overfit
    report = json.loads((root / "checkpoints" / "report.json").read_text())
    for key in ("base", "difference", "changed"):
        report.pop(key)
    report["order"] = ["tuned"]
    for ex in report["examples"]:
        ex.pop("base")
    report.pop("regression")
    paths = write_report(report, tmp_path, root / "logs" / "metrics.jsonl")
    md = paths["md"].read_text()
    assert "| metric | tuned |" in md and "difference" not in md.split("## Leak check")[0].lower()
    assert "difference" not in summary_table(report) and "eval loss" in summary_table(report)
    assert paths["metrics"].is_file() and paths["loss_curves"].is_file()

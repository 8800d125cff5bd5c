"""The report's numbers are the model's: scored in eval mode (dropout off, the caller's mode restored),
each per-example value read off its own example, and the same whether the train run or `eval` writes it."""

from __future__ import annotations

import json

import pytest
from conftest import extraction_rows, write_jsonl

from llm_finetune.config import load_config

TEXT_ROWS = [{"text": "Maria Santos, 34, lives in Lisbon."},
             {"text": "The quick brown fox jumps over the lazy dog. " * 3},
             {"text": "0123456789 one two three"}]


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory, tiny_model_dir):
    """The tiny project trained with LoRA dropout 0.1, evaluated at the end of the run."""
    from llm_finetune.train import run

    root = tmp_path_factory.mktemp("dropout")
    write_jsonl(root / "train.jsonl", extraction_rows(24))
    write_jsonl(root / "eval.jsonl", extraction_rows(8, offset=100))
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={root / 'train.jsonl'}",
        f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "method.r=8", "method.alpha=16",
        "method.dropout=0.1", "train.learning_rate=0.01", "train.max_steps=12", "train.batch_size=4",
        "train.gradient_accumulation_steps=2", "train.warmup_ratio=0.0", "train.seed=0", "eval.max_new_tokens=12",
        "eval.batch_size=8", "output.tensorboard=false", f"output.dir={root / 'checkpoints'}",
        f"output.logs_dir={root / 'logs'}"])
    return root, run(cfg)


def test_train_report_answers_equal_eval_answers_with_dropout(dropout_run, tmp_path):
    from llm_finetune.cli import main

    root, result = dropout_run
    trained = json.loads((root / "checkpoints" / "report.json").read_text())
    assert main(["eval", "--adapter", str(result.adapter_dir), "--out", str(tmp_path)]) == 0
    evaluated = json.loads((tmp_path / "report.json").read_text())
    assert len(trained["examples"]) == len(evaluated["examples"]) == 8
    for a, b in zip(trained["examples"], evaluated["examples"]):
        assert a["source"] == b["source"]
        assert a["tuned"]["prediction"] == b["tuned"]["prediction"]
        assert a["tuned"]["loss"] == pytest.approx(b["tuned"]["loss"], abs=2e-4)
    assert trained["tuned"]["metrics"]["chrf"]["value"] == pytest.approx(evaluated["tuned"]["metrics"]["chrf"]["value"])


def test_scoring_runs_in_eval_mode_and_restores_the_mode(dropout_run, tiny_model_dir):
    """Scoring a model left in train mode: twice the same answers, and train mode back afterwards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.score import load_eval_set, score_model

    root, result = dropout_run
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    encoder = ChatEncoder(tok, 128)
    examples, encoded = load_eval_set(str(root / "eval.jsonl"), encoder)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir,
                                      is_trainable=True)
    model.train()
    first = score_model(model, "tuned", encoder, examples, encoded, max_new_tokens=12)
    assert model.training and all(m.training for m in model.modules())
    second = score_model(model, "tuned", encoder, examples, encoded, max_new_tokens=12)
    assert first.predictions == second.predictions and first.per_example["loss"] == second.per_example["loss"]
    model.eval()
    reference = score_model(model, "tuned", encoder, examples, encoded, max_new_tokens=12)
    assert not model.training and reference.predictions == first.predictions


def test_mixed_text_and_chat_eval_rows_each_report_their_own_loss(tmp_path, tiny_model_dir):
    """Text rows count in the in-training eval loss but are not scored: the report's rows are the chat
    rows, each with its own loss; `eval` on the same file scores the same rows (text skipped)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.cli import main
    from llm_finetune.data.records import load_examples
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.score import eval_loss
    from llm_finetune.train import run

    chat = extraction_rows(5, offset=60)
    mixed = [TEXT_ROWS[0], chat[0], TEXT_ROWS[1], chat[1], chat[2], TEXT_ROWS[2], chat[3], chat[4]]
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(12))
    write_jsonl(tmp_path / "eval.jsonl", mixed)
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
        f"data.eval_file={tmp_path / 'eval.jsonl'}", "data.max_length=128", "method.dropout=0.1",
        "train.learning_rate=0.01", "train.max_steps=3", "train.batch_size=4", "train.warmup_ratio=0.0",
        "train.eval_steps=3", "train.load_best_at_end=false", "eval.max_new_tokens=4", "eval.compare_base=false",
        "output.tensorboard=false", f"output.dir={tmp_path / 'checkpoints'}", f"output.logs_dir={tmp_path / 'logs'}"])
    result = run(cfg)
    rows = result.report["examples"]
    assert [r["source"].rsplit(":", 1)[1] for r in rows] == ["2", "4", "5", "7", "8"]
    assert result.manifest["data"]["split"]["eval_text_rows"] == 3

    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    encoder = ChatEncoder(tok, 128)
    by_source = {ex.source: ex for ex in load_examples(tmp_path / "eval.jsonl").examples}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    own = [eval_loss(model, [encoder.encode(by_source[r["source"]])], tok.pad_token_id)["loss"] for r in rows]
    assert len(set(round(x, 4) for x in own)) == len(own)  # distinct, so a shifted value cannot pass
    assert [r["tuned"]["loss"] for r in rows] == pytest.approx(own, abs=2e-4)

    assert main(["eval", "--adapter", str(result.adapter_dir), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [r["source"] for r in evaluated["examples"]] == [r["source"] for r in rows]
    assert [r["tuned"]["loss"] for r in evaluated["examples"]] == pytest.approx(own, abs=2e-4)


def test_regression_and_eval_sets_skip_text_rows(tmp_path, chatml_tokenizer):
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.score import load_eval_set

    write_jsonl(tmp_path / "reg.jsonl", [TEXT_ROWS[0], {"instruction": "Capital of France?", "output": "Paris"},
                                         TEXT_ROWS[2], {"prompt": "2+2?", "completion": "4"}])
    examples, encoded = load_eval_set(str(tmp_path / "reg.jsonl"), ChatEncoder(chatml_tokenizer, 128))
    assert [ex.source.rsplit(":", 1)[1] for ex in examples] == ["2", "4"]
    assert [e.source for e in encoded] == [ex.source for ex in examples]


def test_misaligned_examples_and_encodings_are_refused(tmp_path, tiny_model_dir, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.score import load_eval_set, score_model

    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(3))
    encoder = ChatEncoder(chatml_tokenizer, 128)
    examples, encoded = load_eval_set(str(tmp_path / "eval.jsonl"), encoder)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="not the same rows"):
        score_model(model, "m", encoder, examples, encoded[1:] + encoded[:1], max_new_tokens=2)


def test_selection_fraction_chooses_the_checkpoint_off_the_reported_set(tmp_path, tiny_model_dir, chatml_tokenizer):
    """data.selection_fraction holds training rows out for train.eval_steps: the best checkpoint is chosen
    on their loss, they are not trained, and the report is not marked optimistic."""
    from transformers import AutoTokenizer

    from llm_finetune.config import ConfigError
    from llm_finetune.data.prepare import prepare_data
    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(24))
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(4, offset=100))
    settings = [f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                f"data.eval_file={tmp_path / 'eval.jsonl'}", "data.max_length=128", "data.selection_fraction=0.25",
                "method.dropout=0.1", "train.learning_rate=0.01", "train.max_steps=4", "train.batch_size=4",
                "train.warmup_ratio=0.0", "eval.max_new_tokens=4", "eval.compare_base=false",
                "output.tensorboard=false", f"output.dir={tmp_path / 'checkpoints'}",
                f"output.logs_dir={tmp_path / 'logs'}"]
    with pytest.raises(ConfigError, match="data.selection_fraction=0.25 holds rows out for train.eval_steps"):
        run(load_config(None, settings))
    assert not (tmp_path / "checkpoints").exists()

    cfg = load_config(None, settings + ["train.eval_steps=2"])
    result = run(cfg)
    split = result.manifest["data"]["split"]
    assert (split["selection_source"], split["selection_examples"], split["train_examples"]) == ("fraction", 6, 18)
    meta = result.report["meta"]
    assert meta["optimistic"] is False and "best_checkpoint_selection" not in meta
    assert result.report["leaks"]["train_examples"] == 18

    # The logged eval losses are the selection rows' (re-derived: the split is seeded), not the eval file's.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_finetune.evaluation.score import eval_loss

    prepared = prepare_data(load_config(None, settings + ["train.eval_steps=2"]),
                            AutoTokenizer.from_pretrained(result.adapter_dir))
    selected = {e.source for e in prepared.selection}
    assert len(selected) == 6 and not selected & {e.source for e in prepared.train}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    best = result.manifest["best_checkpoint"]
    assert best["eval_loss"] == pytest.approx(eval_loss(model, prepared.selection, 0)["loss"], rel=1e-5)
    assert abs(best["eval_loss"] - result.report["tuned"]["eval_loss"]) > 1e-4  # the eval file's is another number

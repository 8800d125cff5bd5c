"""End to end on the tiny model: loss falls, only LoRA weights change, the adapter reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from llm_finetune.config import load_config
from llm_finetune.data.records import DataError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One training run shared by the assertions below (it takes a few seconds)."""
    from conftest import extraction_rows

    from llm_finetune.train import run

    root = tmp_path_factory.mktemp("run")
    write_jsonl(root / "train.jsonl", extraction_rows(24))
    write_jsonl(root / "eval.jsonl", extraction_rows(8, offset=100))
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={root / 'train.jsonl'}",
        f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "method.dropout=0.0",
        "train.learning_rate=0.01", "train.max_steps=15", "train.logging_steps=1", "train.warmup_ratio=0.0",
        "train.save_steps=10", "train.seed=7", "eval.max_new_tokens=12", f"output.dir={root / 'checkpoints'}",
        f"output.logs_dir={root / 'logs'}",
    ])
    result = run(cfg)
    return root, cfg, result


def test_loss_falls(trained):
    root, _, result = trained
    steps = [json.loads(line) for line in (root / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25  # from ~ln(vocab) at random init
    assert result.report["tuned"]["eval_loss"] < result.report["base"]["eval_loss"]


def test_lora_changed_and_base_did_not(trained, tiny_model_dir):
    from safetensors.torch import load_file

    root, _, result = trained
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means trained
    assert not any("lora" not in k for k in adapter), "only adapter weights are saved"
    # The base model on disk is untouched, and the trained model's base weights equal it.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    tuned_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in tuned.state_dict().items() if "lora_" not in k}
    for name, value in base.state_dict().items():
        assert torch.equal(value, tuned_base[name]), name


def test_adapter_reloads_with_plain_peft_and_same_logits(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.data.prepare import prepare_data
    from llm_finetune.evaluation.score import eval_loss
    from llm_finetune.models import load_tokenizer

    root, cfg, result = trained
    tok = AutoTokenizer.from_pretrained(result.adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    model.eval()
    # The saved adapter is the model the run measured: its eval loss on the run's own held-out rows is the
    # tuned loss in the report (not the base's, not an earlier checkpoint's).
    held_out = prepare_data(cfg, load_tokenizer(str(tiny_model_dir))).eval
    reloaded_loss = eval_loss(model, held_out, tok.pad_token_id)["loss"]
    assert reloaded_loss == pytest.approx(result.report["tuned"]["eval_loss"], abs=1e-5)
    assert reloaded_loss < result.report["base"]["eval_loss"] - 0.1
    ids = tok("Bo Chen, 31, lives in Oslo.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert not torch.allclose(a, base)  # the adapter does something
    # Reloading a second time in a fresh model reproduces the logits exactly.
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, a)


def test_output_folder_describes_itself(trained):
    root, cfg, result = trained
    names = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "run_config.json", "run_manifest.json", "eval_report.json"} <= names
    assert any(n in names for n in ("chat_template.jinja", "chat_template.json")) or "chat_template" in \
        json.loads((result.adapter_dir / "tokenizer_config.json").read_text())
    manifest = json.loads((result.adapter_dir / "run_manifest.json").read_text())
    assert manifest["data"]["train_file"]["sha256"] and manifest["data"]["tokenizer"]["sha256"]
    assert manifest["versions"]["torch"] and manifest["versions"]["peft"]
    assert manifest["training"]["seed"] == cfg.train.seed == 7  # the configured seed, not a default
    assert manifest["training"]["tokens_seen"] > 0 and manifest["wall_time_s"] > 0
    saved = json.loads((result.adapter_dir / "run_config.json").read_text())
    assert saved["train"]["learning_rate"] == 0.01 and saved["train"]["seed"] == 7
    # Intermediate checkpoint and the log.
    assert (root / "checkpoints" / "checkpoint-10").is_dir()
    log = (root / "logs" / "training.log").read_text()
    assert "training done" in log and "evaluation on" in log
    assert not list(result.adapter_dir.parent.glob(".adapter_model.tmp-*"))


def test_bad_data_writes_nothing(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a"'])
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                             "data.eval_file=null", f"output.dir={tmp_path / 'ck'}",
                             f"output.logs_dir={tmp_path / 'logs'}"])
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid JSON"):
        run(cfg)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_the_config_is_never_changed_and_the_saved_one_is_resolved(tmp_path, tiny_model_dir):
    """run() reads the config and saves a resolved copy (the method's learning rate filled in); the
    caller's config is exactly what it loaded, so one value never has two sources."""
    import copy

    from conftest import extraction_rows

    from llm_finetune.methods import METHODS
    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(8))
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                             "data.eval_file=null", "train.max_steps=2", f"output.dir={tmp_path / 'ck'}",
                             f"output.logs_dir={tmp_path / 'logs'}", "output.tensorboard=false"])
    before = copy.deepcopy(cfg.to_dict())
    assert cfg.train.learning_rate is None
    result = run(cfg)
    assert cfg.to_dict() == before
    saved = json.loads((result.adapter_dir / "run_config.json").read_text())
    assert saved["train"]["learning_rate"] == METHODS["lora"].learning_rate == result.manifest["training"]["learning_rate"]
    assert {k: v for k, v in saved.items() if k != "train"} == {k: v for k, v in before.items() if k != "train"}

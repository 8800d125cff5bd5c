"""init: a new project in the repository's layout that trains as it is (here on the tiny model)."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from llm_finetune.cli import main
from llm_finetune.config import load_config
from llm_finetune.data.records import load_examples


def test_init_then_train_in_the_new_folder(tmp_path, tiny_model_dir, monkeypatch, capsys):
    project = tmp_path / "my-project"
    assert main(["init", str(project)]) == 0
    assert "run_finetune.py" in capsys.readouterr().out
    for rel in ("config/lora_config.json", "data/train.jsonl", "data/eval.jsonl", "scripts/run_finetune.py",
                "requirements.txt", "README.md"):
        assert (project / rel).is_file(), rel
    assert (project / "checkpoints").is_dir() and (project / "logs").is_dir()
    assert len(load_examples(project / "data/train.jsonl").examples) >= 8
    monkeypatch.chdir(project)
    cfg = load_config("config/lora_config.json")
    assert cfg.model.name_or_path == "default" and cfg.method.name == "lora"
    assert "llm-finetune" in (project / "requirements.txt").read_text()

    # Run the project's own script, from another folder, as a user would (in-process).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "run_finetune.py", "--config", "my-project/config/lora_config.json",
        "--set", f"model.name_or_path={tiny_model_dir}", "--set", "train.epochs=1",
        "--set", "eval.max_new_tokens=4", "--set", "data.max_length=128"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(project / "scripts/run_finetune.py"), run_name="__main__")
    assert done.value.code == 0
    adapter = project / "checkpoints" / "adapter_model"
    assert (adapter / "adapter_model.safetensors").is_file()
    manifest = json.loads((adapter / "run_manifest.json").read_text())
    assert manifest["data"]["train"]["kept"] == 12 and manifest["training"]["steps"] == 3
    assert (project / "logs" / "training.log").is_file()


def test_init_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["init", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

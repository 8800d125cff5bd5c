"""Weights load from safetensors only: a pickle (.bin/.pt/.pth) offered as an adapter or a base is refused,
naming the file and the risk, before it is read; `model.allow_pickle` / `--allow-pickle` opt in."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import extraction_rows, write_jsonl

from llm_finetune.cli import main
from llm_finetune.config import load_config
from llm_finetune.errors import ArtifactError
from llm_finetune.models import load_model


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def _pickle_adapter(tmp_path, tiny_model_dir):
    """A real adapter folder whose weights are a pickle with a payload (no safetensors beside it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "stranger_adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(str(marker))}, folder / "adapter_model.bin")
    return folder, marker


@pytest.mark.parametrize("verb", ["generate", "merge", "export"])
def test_a_pickle_adapter_is_refused_before_it_is_read(tmp_path, tiny_model_dir, capsys, verb):
    folder, marker = _pickle_adapter(tmp_path, tiny_model_dir)
    argv = {"generate": ["generate", "hello", "--adapter", str(folder)],
            "merge": ["merge", str(folder), "--out", str(tmp_path / "merged")],
            "export": ["export", "--adapter", str(folder), "--out", str(tmp_path / "merged.gguf")]}[verb]
    code = main([*argv, "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "adapter_model.bin" in err and "pickle" in err and "--allow-pickle" in err
    assert not marker.exists()  # nothing was unpickled
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.gguf").exists()


def test_exporting_a_pickle_base_is_refused_before_it_is_read(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "pickled_base"
    shutil.copytree(tiny_model_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(str(marker))}, folder / "pytorch_model.bin")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "base.gguf")]) == 2
    err = capsys.readouterr().err
    assert "export --model: " in err and "pytorch_model.bin: weights stored as a Python pickle" in err
    assert "--allow-pickle" in err and not marker.exists() and not (tmp_path / "base.gguf").exists()


def test_training_from_a_pickle_init_adapter_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    folder, marker = _pickle_adapter(tmp_path, tiny_model_dir)
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(4))
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                             "data.eval_file=null", f"method.init_adapter={folder}", "train.max_steps=1",
                             f"output.dir={tmp_path / 'ck'}", f"output.logs_dir={tmp_path / 'logs'}"])
    with pytest.raises(ArtifactError, match=r"method.init_adapter: .*adapter_model.bin: weights stored as a Python "
                                            r"pickle .* model.allow_pickle=true"):
        run(cfg)
    assert not marker.exists() and not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_a_pickle_base_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled_base"
    shutil.copytree(tiny_model_dir, folder)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"model: .*pytorch_model.bin: weights stored as a Python pickle"):
        load_model(str(folder))
    allowed = load_model(str(folder), allow_pickle=True).eval()  # the user opted in for a file they trust
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(allowed(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_allow_pickle_is_a_config_key_off_by_default(tiny_model_dir):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}"])
    assert cfg.model.allow_pickle is False
    assert load_config(None, ["model.allow_pickle=true"]).model.allow_pickle is True
    assert json.dumps(cfg.to_dict()["model"]["allow_pickle"]) == "false"


def test_a_hub_token_in_the_environment_is_written_nowhere(tmp_path, tiny_model_dir, monkeypatch):
    """Every file a run writes (log, metrics, manifest, config, model card, report) is free of the token."""
    from llm_finetune.train import run

    secret = "hf_NeverWriteMe0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(4, offset=50))
    run(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                           f"data.eval_file={tmp_path / 'eval.jsonl'}", "train.max_steps=2", "eval.max_new_tokens=4",
                           f"output.dir={tmp_path / 'ck'}", f"output.logs_dir={tmp_path / 'logs'}"]))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert leaked == []

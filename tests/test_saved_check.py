"""The saved adapter is the trained one, checked before a run reports success: every tensor's shape against
the trained weight's full shape (a sharded save that kept one process's slice is caught), and, with
output.verify_reload, the folder loaded back from disk gives the trained model's loss on a fixed batch. A
failed check keeps the previous adapter and the checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import extraction_rows, write_jsonl
from peft import PeftModel

from llm_finetune.config import load_config
from llm_finetune.errors import SaveCheckFailed


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(24))
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(4, offset=24))
    return tmp_path


def _cfg(root, model_dir, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}",
                              f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "train.max_steps=4",
                              "train.batch_size=4", "train.learning_rate=5e-3", "train.save_steps=2",
                              f"output.dir={root / 'ck'}", f"output.logs_dir={root / 'logs'}",
                              "output.tensorboard=false", "eval.max_new_tokens=4", *extra])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_run_checks_the_saved_shapes_and_verify_reload_reloads_the_trained_model(data, tiny_model_dir, method):
    from llm_finetune.train import run

    result = run(_cfg(data, tiny_model_dir, f"method.name={method}", "output.verify_reload=always"))
    check = result.manifest["saved_check"]
    assert check["tensors"] > 0 and check["sharded"] is False
    assert check["reload"]["relative_difference"] <= 1e-5  # same weights, same dtypes: the same loss
    assert check["reload"]["trained_loss"] == pytest.approx(check["reload"]["reloaded_loss"], rel=1e-5)
    saved = json.loads((result.adapter_dir / "run_manifest.json").read_text())["saved_check"]
    assert saved == json.loads(json.dumps(check))
    assert "saved adapter reloaded from disk" in (data / "logs" / "training.log").read_text()


def _previous_adapter(data, tiny_model_dir):
    from llm_finetune.train import run

    first = run(_cfg(data, tiny_model_dir))
    return first.adapter_dir, (first.adapter_dir / "adapter_model.safetensors").read_bytes()


def test_a_save_that_kept_part_of_each_weight_is_refused_and_the_previous_adapter_kept(data, tiny_model_dir,
                                                                                       monkeypatch):
    """What a sharded save without a gather writes: each process's slice (here the first half of every LoRA
    weight's rows). The run fails naming the tensors, and the adapter of the previous run is untouched."""
    from llm_finetune.train import run

    adapter_dir, before = _previous_adapter(data, tiny_model_dir)
    save = PeftModel.save_pretrained

    def save_one_shard(self, folder, **kwargs):
        from peft.utils import get_peft_model_state_dict

        shard = {k: v[: max(1, v.shape[0] // 2)].clone() for k, v in get_peft_model_state_dict(self).items()}
        from safetensors.torch import save_file

        save(self, folder, **kwargs)
        save_file(shard, f"{folder}/adapter_model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(PeftModel, "save_pretrained", save_one_shard)
    with pytest.raises(SaveCheckFailed, match=r"not the trained ones .*lora_A.weight: saved \[8, 96\], the "
                       r"trained weight is \[16, 96\].*the previous adapter and the checkpoints are kept"):
        run(_cfg(data, tiny_model_dir, "output.overwrite=true", "train.learning_rate=1e-2"))
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == before
    assert (data / "ck" / "checkpoint-4").is_dir()


def test_a_save_with_the_right_shapes_but_other_values_fails_the_reload_check(data, tiny_model_dir, monkeypatch):
    """A save whose shapes are right but whose values are not the trained ones (a shard's padding, an
    un-gathered zero slice): only loading it back shows it."""
    from llm_finetune.train import run

    adapter_dir, before = _previous_adapter(data, tiny_model_dir)
    save = PeftModel.save_pretrained

    def save_zeros(self, folder, **kwargs):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        save(self, folder, **kwargs)
        weights = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in get_peft_model_state_dict(self).items()}
        save_file(weights, f"{folder}/adapter_model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(PeftModel, "save_pretrained", save_zeros)
    with pytest.raises(SaveCheckFailed, match=r"loaded back from disk, gives loss .* where the trained model gives"):
        run(_cfg(data, tiny_model_dir, "output.verify_reload=always", "train.learning_rate=1e-2"))
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_full_shapes_are_read_through_deepspeed_zero3_partitioned_weights(tiny_model_dir, tmp_path):
    """Under ZeRO-3 each process's tensor is empty and the full shape is kept in `ds_shape`: the check compares
    the saved tensors with that, not with the empty local slice."""
    from llm_finetune.config import MethodConfig
    from llm_finetune.methods import apply_method
    from llm_finetune.models import load_model, resolve_source
    from llm_finetune.saved_check import check_shapes

    model = apply_method(load_model(resolve_source(str(tiny_model_dir)), "float32"), MethodConfig(name="lora"))
    model.save_pretrained(tmp_path / "whole")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.ds_shape = p.shape
            p.data = torch.empty(0)
    assert check_shapes(tmp_path / "whole", model, {}) > 0
    model.save_pretrained(tmp_path / "partitioned")  # what a save without the gather writes: empty tensors
    with pytest.raises(SaveCheckFailed, match=r"lora_A.weight: saved \[0\], the trained weight is \[16, \d+\]"):
        check_shapes(tmp_path / "partitioned", model, {})

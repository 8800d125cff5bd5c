"""Slow: the merge check on the real default model, whose logits are large (|logit| ~ 50).

A float32 merge reorders float operations, and which kernels run (AVX-512 or AMX) changes the
accumulation order too; the gap grows with the logit scale. The check must pass a correct merge on
every CPU and still fail one that is off by a 1% scaling of the adapter.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_adapter(tmp_path_factory):
    """A LoRA adapter on SmolLM2-135M whose update moves the logits as a trained one does."""
    from peft import LoraConfig, get_peft_model

    from llm_finetune.models import load_model, load_tokenizer, resolve_source

    source = resolve_source("default")
    torch.manual_seed(0)
    model = get_peft_model(load_model(source, "float32"),
                           LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    path = tmp_path_factory.mktemp("real_adapter")
    model.save_pretrained(path)
    load_tokenizer(source).save_pretrained(path)
    (path / "run_manifest.json").write_text(json.dumps({"model": {"kind": "default"}, "quantization": "none"}))
    return path


def test_correct_merge_passes_on_real_logits(real_adapter):
    from llm_finetune.export.merge import merge_in_memory

    _, _, checks, _, _ = merge_in_memory(real_adapter)
    check = checks[0]
    assert check.scale > 20  # real logits, not a tiny model's
    assert check.ok, check.line()
    assert check.max_abs_diff > 0  # a real float32 reordering happened, and was judged by scale
    assert check.tolerance == pytest.approx(1e-4 * check.scale)


def test_a_one_percent_scaling_error_fails(real_adapter):
    from peft import PeftModel

    from llm_finetune.export.check import compare, logits_for
    from llm_finetune.export.check import prompt_ids as _prompt_ids
    from llm_finetune.models import load_model, load_tokenizer, resolve_source

    source = resolve_source("default")
    prompts = _prompt_ids(load_tokenizer(str(real_adapter)))
    model = PeftModel.from_pretrained(load_model(source, "float32"), str(real_adapter)).eval()
    reference = logits_for(model, prompts)
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: v * 1.01 for k, v in module.scaling.items()}
    check = compare("off by 1%", reference, logits_for(model, prompts))
    assert not check.ok, check.line()

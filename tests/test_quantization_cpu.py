"""4-bit bases on both kinds of CPU: bitsandbytes packs 4-bit weights for a fused kernel on CPUs with
AVX512-BF16 and then needs out_features % 32 == 0 and in_features % 64 == 0; elsewhere it takes any shape.
Training and evaluation loads keep the packed kernel off (it has no backward); inference loads use it
and leave the layers it cannot take unquantised.

Both branches are exercised on any machine by forcing the capability probe bitsandbytes' layers read
(`bitsandbytes.nn.modules.has_avx512bf16`). Where the packed kernel really exists, it is also run.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16  # noqa: E402
from conftest import build_tiny_llama  # noqa: E402

from llm_finetune.config import MethodConfig  # noqa: E402
from llm_finetune.methods import apply_method  # noqa: E402
from llm_finetune.models import bnb_cpu_packs_4bit, cpu_4bit_shape_problem, load_model, quantization_skips  # noqa: E402

REAL_PACKING = bool(has_avx512bf16()) and not torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, chatml_tokenizer):
    """A tiny Llama whose every linear layer fits the packed kernel (hidden 64, 2 KV heads of 16)."""
    path = tmp_path_factory.mktemp("tiny64")
    build_tiny_llama(path, chatml_tokenizer, hidden=64)
    return path


@pytest.fixture(params=[True, False], ids=["packs", "no-packing"])
def packing(request, monkeypatch):
    """Force bitsandbytes' AVX512-BF16 probe (read by our planner and by every Linear4bit) either way."""
    from bitsandbytes.nn import modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param)
    return request.param


def _linear4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _packs_cleanly(module) -> bool:
    """Run bitsandbytes' own CPU repacking (what its first eval-mode forward does) on a copy."""
    weight = module.weight
    try:
        _convert_weight_packed_for_cpu(weight.data.clone(), copy.deepcopy(weight.quant_state))
    except (AssertionError, RuntimeError):
        return False
    return True


def test_shape_rule():
    assert cpu_4bit_shape_problem(64, 64) is None
    assert cpu_4bit_shape_problem(576, 1536) is None  # SmolLM2's down_proj
    assert "out_features 48" in cpu_4bit_shape_problem(48, 64)
    assert "in_features 48" in cpu_4bit_shape_problem(64, 48)


def test_probe_follows_bitsandbytes(packing):
    assert bnb_cpu_packs_4bit() is packing


def test_unfit_layers_stay_unquantised_and_are_listed(packing, tiny_model_dir, caplog):
    """Inference load: the default tiny model (hidden 48) has no layer the packed kernel takes."""
    caplog.set_level(logging.WARNING, logger="llm_finetune")
    skips = quantization_skips(str(tiny_model_dir), "4bit")
    model = load_model(str(tiny_model_dir), "float32", "4bit", cpu_4bit_packing=True)
    quantised = _linear4bit(model)
    if packing:
        assert "model.layers.0.self_attn.k_proj" in skips and "lm_head" in skips
        assert "model.layers.0.self_attn.k_proj (24x48: out_features 24 is not a multiple of 32" in caplog.text
        assert not quantised  # every decoder layer has an unfit shape here
        assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    else:
        assert skips is None and not caplog.text
        assert "model.layers.0.self_attn.k_proj" in quantised
        assert not _packs_cleanly(quantised["model.layers.0.self_attn.k_proj"])  # what would have crashed


def test_fit_layers_are_quantised_and_pack(packing, tiny64_dir, chatml_tokenizer):
    model = load_model(str(tiny64_dir), "float32", "4bit", cpu_4bit_packing=True)
    quantised = _linear4bit(model)
    assert len(quantised) == 2 * 7  # q, k, v, o, gate, up, down in both layers; the head stays
    assert all(_packs_cleanly(m) for m in quantised.values())
    if packing and not REAL_PACKING:
        return  # the packed kernel itself is only registered on CPUs that have it
    model.eval()
    ids = torch.tensor([chatml_tokenizer("Ana Silva, 20, lives in Lisbon.")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=chatml_tokenizer.pad_token_id)
    assert torch.isfinite(logits).all() and out.shape[1] > ids.shape[1]
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantised.values()]
    assert all(packed) is packing  # the branch forced is the branch bitsandbytes took


def _qlora(model_dir, **load):
    torch.manual_seed(0)
    model = load_model(str(model_dir), "float32", "4bit", **load)
    model = apply_method(model, MethodConfig(name="qlora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # as after some training: B != 0, so every A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _grads(model, ids):
    model.zero_grad()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _eval_pass(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_training_loads_never_pack(packing, tiny_model_dir, chatml_tokenizer):
    """Any layer shape, either probe: an eval pass mid-training changes neither the numbers nor the gradients."""
    model = _qlora(tiny_model_dir)
    layers = _linear4bit(model)
    assert "base_model.model.model.layers.0.self_attn.k_proj.base_layer" in layers  # 24x48, quantised all the same
    ids = torch.tensor([chatml_tokenizer("Bo Chen, 31, lives in Oslo.")["input_ids"]])
    before = _grads(model, ids)
    first = _eval_pass(model, ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    assert torch.equal(_eval_pass(model, ids), first)
    after = _grads(model, ids)
    for name, grad in before.items():
        assert torch.equal(after[name], grad), name


@pytest.mark.skipif(not REAL_PACKING, reason="needs a CPU whose bitsandbytes packs 4-bit weights (AVX512-BF16)")
def test_why_training_loads_keep_the_packed_kernel_off(tiny64_dir, chatml_tokenizer):
    """With packing allowed, an eval pass breaks the gradients of every later training step."""
    model = _qlora(tiny64_dir, cpu_4bit_packing=True)
    ids = torch.tensor([chatml_tokenizer("Bo Chen, 31, lives in Oslo.")["input_ids"]])
    reference = _grads(model, ids)
    _eval_pass(model, ids)
    broken = _grads(model, ids)
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert broken[first] is None or not torch.allclose(broken[first], reference[first], atol=1e-6)

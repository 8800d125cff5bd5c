"""Which dtype the weights are loaded in and which one the forward computes in (models.training_precision):
fp32 master weights wherever weights train in full, the half dtype as autocast; fp32 adapters on a half base."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import extraction_rows, write_jsonl

from llm_finetune.config import load_config
from llm_finetune.models import Precision, pick_dtype, training_precision

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _machine(monkeypatch, cuda: bool, bf16: bool = True) -> None:
    """Pretend this machine has (or lacks) a CUDA GPU, with or without bf16 support. What probes CUDA
    once at import (bitsandbytes picks its backend) is imported first, on the real machine."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda and bf16)


@pytest.mark.parametrize("cuda,bf16,requested,full,expected", [
    # A GPU with bf16: full keeps fp32 master weights and computes in bf16; a frozen base is loaded in bf16.
    (True, True, "auto", True, Precision(F32, BF16)),
    (True, True, "auto", False, Precision(BF16, BF16)),
    (True, True, "bfloat16", True, Precision(F32, BF16)),
    (True, True, "float16", True, Precision(F32, F16)),
    (True, True, "float16", False, Precision(F16, F16)),
    (True, True, "float32", True, Precision(F32, None)),
    # A GPU without bf16: full computes in fp16 (with loss scaling); a frozen base stays fp32 as before.
    (True, False, "auto", True, Precision(F32, F16)),
    (True, False, "auto", False, Precision(F32, None)),
    # CPU: fp32 throughout by default; an explicit bf16 full run still keeps fp32 master weights.
    (False, False, "auto", True, Precision(F32, None)),
    (False, False, "auto", False, Precision(F32, None)),
    (False, False, "bfloat16", True, Precision(F32, BF16)),
    (False, False, "bfloat16", False, Precision(BF16, BF16)),
    (False, False, "float16", True, Precision(F32, None)),  # the Trainer has no fp16 autocast on CPU
])
def test_precision_decision(monkeypatch, cuda, bf16, requested, full, expected):
    _machine(monkeypatch, cuda, bf16)
    assert training_precision(requested, trains_full_weights=full) == expected


def _changed_fraction(model, step_dtype) -> float:
    """One AdamW step at lr 2e-5 (full fine-tuning's default) under autocast; the fraction of weights it moved."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64]])
    with torch.autocast("cpu", dtype=step_dtype):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    return moved / sum(b.numel() for b in before)


def test_full_finetune_updates_survive_only_in_fp32(monkeypatch, tiny_model_dir):
    """On a (pretend) bf16 GPU, `auto` used to load the full model in bf16, where AdamW's first updates
    (about lr in size) are below the rounding step of most weights and vanish; the fp32 load keeps them."""
    from transformers import AutoModelForCausalLM

    _machine(monkeypatch, cuda=True)
    precision = training_precision("auto", trains_full_weights=True)
    bf16_load = pick_dtype("auto")  # what a full run loaded before
    assert bf16_load == BF16 and precision.load == F32
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)  # compute on this CPU
        lost = _changed_fraction(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=bf16_load), BF16)
        kept = _changed_fraction(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=precision.load),
                                 precision.autocast)
    assert lost < 0.5 and kept > 0.99, (lost, kept)


def _cfg(tmp_path, model_dir, *extra):
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(8))
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                              "data.eval_file=null", f"output.dir={tmp_path / 'ck'}",
                              f"output.logs_dir={tmp_path / 'logs'}", *extra])


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("method,extra,load,autocast", [
    ("full", [], "float32", "bf16"),
    ("lora", [], "bfloat16", "bf16"),
    ("lora", ["method.modules_to_save=[\"lm_head\"]"], "float32", "bf16"),  # the head's copy trains in full
])
def test_cuda_run_loads_and_autocasts(monkeypatch, tmp_path, tiny_model_dir, method, extra, load, autocast):
    """A (pretend) CUDA bf16 run: the dtype run() loads the model in, and the Trainer's autocast flag."""
    import llm_finetune.train as train
    from llm_finetune.trainer import trainer_options

    _machine(monkeypatch, cuda=True)
    cfg = _cfg(tmp_path, tiny_model_dir, f"method.name={method}", *extra)
    args = trainer_options(cfg, 10, 1e-4)  # TrainingArguments itself would initialise the (absent) GPU
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (autocast == "bf16", autocast == "fp16", False)
    seen = {}

    def spy(source, dtype="auto", *a, **k):
        seen["dtype"] = dtype.load_name if isinstance(dtype, Precision) else dtype
        raise _Loaded

    monkeypatch.setattr(train, "load_model", spy)
    with pytest.raises(_Loaded):
        train.run(cfg)
    assert seen["dtype"] == load


def test_gpu_without_bf16_full_run_uses_fp16_autocast(monkeypatch, tmp_path, tiny_model_dir):
    from llm_finetune.trainer import trainer_options

    _machine(monkeypatch, cuda=True, bf16=False)
    args = trainer_options(_cfg(tmp_path, tiny_model_dir, "method.name=full"), 10, 1e-5)
    assert args["fp16"] and not args["bf16"]


def test_cpu_run_is_fp32_without_autocast(tmp_path, tiny_model_dir, monkeypatch):
    from llm_finetune.trainer import run_precision, training_arguments

    _machine(monkeypatch, cuda=False)
    for method in ("full", "lora"):
        cfg = _cfg(tmp_path, tiny_model_dir, f"method.name={method}")
        args = training_arguments(cfg, 10, 1e-4)
        assert not args.bf16 and not args.fp16 and args.use_cpu
        assert run_precision(cfg) == Precision(F32, None)


ADAPTER_METHODS = ["lora", "dora", "rslora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_adapter_weights_are_fp32_on_a_bf16_base(tiny_model_dir, name):
    """PEFT upcasts the adapter's own weights (autocast_adapter_dtype): the base is bf16, what trains is fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune import methods
    from llm_finetune.config import MethodConfig

    options = {"num_virtual_tokens": 4} if methods.METHODS[name].family == "prompt" else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=BF16)
    tokens = [3, 4] if name == "lora" else None  # rows of added tokens train too
    model = methods.apply_method(model, MethodConfig(name=name, **options), total_steps=20,
                                 tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                                 tokenizer_path=str(tiny_model_dir), trainable_token_indices=tokens)
    params = dict(model.named_parameters())
    trainable = {n: p.dtype for n, p in params.items() if p.requires_grad}
    assert trainable and set(trainable.values()) == {F32}, trainable
    assert {p.dtype for n, p in params.items() if not p.requires_grad} == {BF16}


# ---------------------------------------------------------------------------------------------
# CPUs: a bf16 frozen base where the CPU computes bf16 in hardware


@pytest.mark.parametrize("fast,full,quantized,expected", [
    (True, False, False, Precision(BF16, None, F32)),  # bf16 products; activations, adapter, optimizer fp32
    (True, True, False, Precision(F32, None)),  # weights trained in full stay fp32
    (True, False, True, Precision(F32, None)),  # a quantised base computes as bitsandbytes' CPU kernels do
    (False, False, False, Precision(F32, None)),  # no bf16 units: bf16 would be emulated, slower than fp32
])
def test_cpu_auto_precision_follows_what_the_cpu_can_do(monkeypatch, fast, full, quantized, expected):
    _machine(monkeypatch, cuda=False)
    monkeypatch.setenv("LLM_FINETUNE_CPU_BF16", "1" if fast else "0")
    precision = training_precision("auto", trains_full_weights=full, quantized=quantized)
    assert precision == expected and precision.why
    assert training_precision("float32", trains_full_weights=full) == Precision(F32, None)  # asked for: kept


def test_cpu_probe_reads_the_bf16_units(monkeypatch):
    from llm_finetune.models import cpu_bf16_is_fast

    monkeypatch.delenv("LLM_FINETUNE_CPU_BF16")
    for amx, avx in [(True, True), (False, True), (True, False), (False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        fast, why = cpu_bf16_is_fast()
        assert fast == (amx or avx) and (not fast or ("AMX" in why) == amx)


def test_bf16_base_learns_as_fp32_does(monkeypatch, tmp_path, tiny_model_dir):
    """The same run on a float32 and on a bf16 frozen base (fp32 adapter): per-step losses within 1%, and the
    manifest says which precision was used and why."""
    from llm_finetune.train import run

    def losses(fast: str, name: str):
        monkeypatch.setenv("LLM_FINETUNE_CPU_BF16", fast)
        result = run(_cfg(tmp_path / name, tiny_model_dir, "train.max_steps=8", "train.logging_steps=1",
                          "method.dropout=0.0", "train.learning_rate=5e-3", "data.eval_file=null"))
        records = [json.loads(line) for line in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r], result.manifest["precision"]

    fp32, p32 = losses("0", "fp32")
    bf16, p16 = losses("1", "bf16")
    assert p32["load"] == "float32" and p32["autocast"] is None
    assert p16["load"] == "bfloat16" and p16["activations"] == "float32" and p16["why"]
    assert len(fp32) == len(bf16) == 8 and fp32[-1] < fp32[0]
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.01 * a, (fp32, bf16)


@pytest.mark.parametrize("name", ["lora", "dora", "adalora"])
def test_a_bf16_base_keeps_no_fp32_copy_of_layer_inputs_for_backward(monkeypatch, tmp_path, tiny_model_dir, name):
    """Under autocast (bf16 base) PEFT's cast of each adapted layer's input to the fp32 adapter is off
    while training: the adapter path gets the bf16 input itself, so the backward pass keeps no fp32 copy
    of it (measured on chat data: 5.6 vs 3.9 GB peak). Evaluation, without autocast, still casts."""
    from transformers import AutoModelForCausalLM

    from llm_finetune import methods
    from llm_finetune.config import MethodConfig
    from llm_finetune.trainer import FinetuneTrainer, training_arguments

    cfg = _cfg(tmp_path, tiny_model_dir, f"method.name={name}", "model.dtype=bfloat16")  # the all-bf16 forward
    model = methods.apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=BF16),
                                 MethodConfig(name=name, dropout=0.0), total_steps=10)
    trainer = FinetuneTrainer(model=model, args=training_arguments(cfg, 10, 1e-3))
    assert trainer.args.bf16
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64, 9, 8, 7, 6]])
    seen = []  # the dtype each adapter path receives: LoRA's and DoRA's lora_A, AdaLoRA's dropout
    for module_name, module in model.named_modules():
        if module_name.endswith("lora_A.default" if name != "adalora" else "lora_dropout.default"):
            module.register_forward_pre_hook(  # token activations only (DoRA also feeds lora_A its weights)
                lambda m, args: seen.append(args[0].dtype) if args[0].shape[:-1] == ids.shape else None)
    model.train()
    with torch.autocast("cpu", dtype=BF16):
        trainer.compute_loss(model, {"input_ids": ids, "labels": ids}).backward()
    assert seen and set(seen) == {BF16}, set(seen)
    seen.clear()
    model.eval()
    with torch.no_grad():  # no autocast: PEFT casts to the fp32 adapter as before
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert set(seen) == {F32}


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_every_adapter_method_trains_on_the_bf16_base(monkeypatch, tmp_path, tiny_model_dir, name):
    from llm_finetune.train import run

    monkeypatch.setenv("LLM_FINETUNE_CPU_BF16", "1")
    options = ["method.num_virtual_tokens=4"] if name.endswith("tuning") else []
    result = run(_cfg(tmp_path, tiny_model_dir, f"method.name={name}", *options, "train.max_steps=3",
                      "train.logging_steps=1", "data.eval_file=null"))
    assert result.manifest["precision"]["load"] == "bfloat16"
    assert result.manifest["precision"]["activations"] == "float32"
    losses = [json.loads(line).get("loss") for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] and all(math.isfinite(x) for x in losses if x is not None)


def test_a_bf16_base_keeps_fp32_activations(tiny_model_dir):
    """The precision `auto` picks on a CPU with bf16 units: the base's matrices stay bf16 and multiply in bf16,
    everything between them is fp32 (models.keep_activations_fp32), with or without autocast. (That this learns
    as fp32 does, where the all-bf16 forward does not, is shown on the real model: test_default_model.py.)"""
    from llm_finetune.models import load_model

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64, 9, 8, 7, 6, 31, 30, 2, 1]])
    kept = load_model(str(tiny_model_dir), Precision(BF16, None, F32)).eval()
    assert kept.model.layers[0].mlp.down_proj.weight.dtype == BF16 and kept.model.embed_tokens.weight.dtype == BF16
    assert kept.model.norm.weight.dtype == F32 and kept.model.layers[0].input_layernorm.weight.dtype == F32
    products = []
    kept.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: products.append(args[0].dtype))
    with torch.no_grad():
        out = kept(input_ids=ids, output_hidden_states=True)
        with torch.autocast("cpu", dtype=BF16):
            assert kept(input_ids=ids).logits.dtype == F32
        fp32 = load_model(str(tiny_model_dir), "float32")(input_ids=ids).logits
    assert products[0] == BF16  # the product's input, as the matrix multiplies it
    assert all(h.dtype == F32 for h in out.hidden_states[1:]) and out.logits.dtype == F32
    assert (out.logits - fp32).norm() / fp32.norm() < 0.02  # bf16 weights and products: 2^-8 relative rounding

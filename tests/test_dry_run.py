"""`train --dry-run`: the plan comes from config.json alone (no weights), and its counts match a real run.
Every shipped config loads, validates and plans."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from llm_finetune.cli import main
from llm_finetune.config import load_config

SHIPPED = sorted((ROOT / "config").glob("*.json"))


def _no_weights(monkeypatch):
    import peft  # noqa: F401  imported first, so it binds the real load_file, not the refusal below
    import safetensors.torch
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a dry run must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


def test_a_config_per_method_is_shipped():
    from llm_finetune.methods import METHODS

    names = {load_config(p).method.name for p in SHIPPED}
    assert names == set(METHODS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_starts_with_its_command_and_plans(path, monkeypatch, capsys):
    raw = json.loads(path.read_text())
    first = next(iter(raw))
    assert first == "_command" and f"--config config/{path.name}" in raw["_command"]
    cfg = load_config(path)  # typed, unknown keys and options of other methods rejected
    monkeypatch.chdir(ROOT)
    _no_weights(monkeypatch)
    # A few rows are enough to exercise the token count; the full demo set only costs time here.
    assert main(["train", "--config", str(path), "--dry-run", "--set", "data.max_train_examples=16"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "optimizer states" in out and cfg.method.name in out


def test_falcon7b_qlora_plan_offline(monkeypatch, capsys):
    from llm_finetune.dry_run import estimate

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_weights(monkeypatch)
    cfg = load_config(ROOT / "config" / "falcon7b_qlora.json")
    plan = estimate(cfg)
    # LoRA r=16 on every linear layer of 32 Falcon-7B blocks (hidden 4544, fused multi-query qkv 4544->4672,
    # MLP 4544->18176->4544): r * (in + out) per layer.
    per_block = 16 * ((4544 + 4672) + (4544 + 4544) + (4544 + 18176) + (18176 + 4544))
    assert plan.trainable == 32 * per_block
    assert 6.9e9 < plan.parameters < 6.95e9  # Falcon-7B's 6.92B
    gib = 2 ** 30
    assert 3.4 * gib < plan.memory["weights"] < 4.0 * gib  # NF4 blocks + bf16 embeddings
    assert plan.memory["optimizer_states"] == 2 * plan.trainable  # 8-bit Adam: two 1-byte states
    assert plan.memory["total"] < 16 * gib  # the scenario: one 16-24 GB GPU
    assert "bundled copy" in plan.config_source
    assert any("need CUDA" in n for n in plan.notes)  # paged optimizer: refused on this CPU, said so


def test_plan_matches_a_real_run(tiny_project, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from llm_finetune import methods
    from llm_finetune.dry_run import estimate
    from llm_finetune.train import run

    config = tiny_project / "config.json"
    for name in ("lora", "dora", "prompt_tuning", "full"):
        raw = json.loads(config.read_text())
        raw["method"] = {"name": name}
        path = tiny_project / f"{name}.json"
        path.write_text(json.dumps(raw))
        cfg = load_config(path)
        plan = estimate(cfg)
        model = AutoModelForCausalLM.from_pretrained(raw["model"]["name_or_path"])
        base = sum(p.numel() for p in model.parameters())
        torch.manual_seed(0)
        real = methods.apply_method(model, cfg.method, total_steps=12)
        assert plan.parameters == base
        assert plan.trainable == methods.count_parameters(real)[0], name
    # Tokens and steps are the real ones; the ETA comes from a measured throughput.
    cfg = load_config(config, ["train.max_steps=2", "eval.compare_base=false"])
    assert estimate(cfg).eta_seconds is None
    assert estimate(cfg, throughput=100.0).eta_seconds == pytest.approx(estimate(cfg).tokens_total / 100.0)
    result = run(cfg)
    plan = estimate(cfg)
    assert plan.steps == 2
    assert plan.tokens_per_epoch == result.manifest["data"]["train"]["tokens"]
    t = result.manifest["training"]
    assert plan.throughput == pytest.approx(t["tokens_seen"] / t["train_runtime_s"])
    assert "previous run" in plan.throughput_source


def test_memory_follows_quantisation_and_optimizer(tiny_project):
    from llm_finetune.dry_run import estimate

    config = tiny_project / "config.json"
    fp32 = estimate(load_config(config))
    q8 = estimate(load_config(config, ["model.quantization=8bit"]))
    q4 = estimate(load_config(config, ["method.name=qlora"]))
    assert q4.memory["weights"] < q8.memory["weights"] < fp32.memory["weights"]
    adam8 = estimate(load_config(config, ["train.optimizer=adamw_8bit"]))
    assert adam8.memory["optimizer_states"] * 4 == fp32.memory["optimizer_states"]
    ckpt = estimate(load_config(config, ["train.gradient_checkpointing=true"]))
    assert ckpt.memory["activations"] < fp32.memory["activations"]


def test_the_plan_per_process_for_several_processes(monkeypatch, capsys):
    """--nproc N: the global batch (batch x accumulation x N) sets the steps, and each device's memory is
    estimated for DDP (a whole replica), FSDP and ZeRO-3 (the state split N ways)."""
    from llm_finetune.dry_run import estimate

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_weights(monkeypatch)
    # method.dropout=0: the recipe's LoRA dropout does not apply to `full` (config validation rejects it)
    cfg = load_config(ROOT / "config" / "falcon7b_qlora.json", ["model.quantization=none", "method.name=full",
                                                                "method.dropout=0", "train.max_steps=null",
                                                                "train.epochs=1"])
    one, four = estimate(cfg), estimate(cfg, world_size=4)
    assert four.batch == (cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                          4 * cfg.train.batch_size * cfg.train.gradient_accumulation_steps)
    if one.steps:  # from the data when it is at hand
        assert four.steps == -(-one.examples // four.batch[2])
    ddp, fsdp, zero3 = (four.per_device[k] for k in ("DDP", "FSDP (full shard)", "DeepSpeed ZeRO-3"))
    assert ddp > one.memory["total"]  # a whole replica, plus its gradient buckets
    state = sum(one.memory[k] for k in ("weights", "adapter", "gradients", "optimizer_states"))
    assert fsdp < ddp - 0.7 * state  # three quarters of the state lives on the other devices
    assert zero3 >= fsdp and not one.per_device
    assert main(["train", "--config", "config/falcon7b_qlora.json", "--dry-run", "--nproc", "4"]) == 0
    out = capsys.readouterr().out
    assert "processes        4: batch" in out and "DeepSpeed ZeRO-3" in out and "memory per device" in out

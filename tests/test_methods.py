"""Every method on the tiny model: trains (loss falls), changes only what it should, saves, reloads in a
fresh process and generates, merges or refuses to; and each builds what its name promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import extraction_rows, write_jsonl

from llm_finetune import methods
from llm_finetune.config import ConfigError, load_config
from llm_finetune.methods import MethodError
from llm_finetune.models import load_model

# The runs below: every method, plus LoRA on an 8-bit base with the 8-bit optimizer.
RUNS = {
    "lora": [],
    "qlora": [],
    "dora": [],
    "rslora": [],
    "adalora": ["method.adalora_init_r=6", "method.adalora_target_r=2", "method.adalora_tinit_ratio=0.2",
                "method.adalora_tfinal_ratio=0.2", "train.learning_rate=1e-2"],
    # A random tiny model moves slowly under the small adapters; the defaults are for pretrained models.
    "ia3": ["train.learning_rate=2e-1"],
    "prompt_tuning": ["method.prompt_init_text=Extract name, age and city as JSON.", "train.learning_rate=3e-1"],
    "prefix_tuning": ["method.num_virtual_tokens=8", "train.learning_rate=1e-1"],
    "p_tuning": ["method.num_virtual_tokens=8", "train.learning_rate=1e-1"],
    # The default 2e-5 suits pretrained models; a random tiny model needs a bigger step to show a fall.
    "full": ["train.learning_rate=1e-3"],
    "lora_8bit": ["method.name=lora", "model.quantization=8bit", "train.optimizer=adamw_8bit"],
}
PEFT_TYPE = {"lora": "LORA", "qlora": "LORA", "dora": "LORA", "rslora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
             "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING",
             "lora_8bit": "LORA"}


def method_of(run_name: str) -> str:
    return "lora" if run_name == "lora_8bit" else run_name


def base_overrides(root, model_dir, name):
    return [f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}",
            f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "train.max_steps=10",
            "train.logging_steps=1", "train.warmup_ratio=0.0", "train.seed=0", "eval.max_examples=2",
            # plain shuffled batches: with length grouping the first and last batches differ in length,
            # which moves their loss more than 10 small steps do
            "train.group_by_length=false",
            "eval.max_new_tokens=2", f"output.dir={root / name / 'checkpoints'}",
            f"output.logs_dir={root / name / 'logs'}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One short run per method through the real entry point (about 2-4 s each)."""
    from llm_finetune.train import run

    root = tmp_path_factory.mktemp("methods")
    write_jsonl(root / "train.jsonl", extraction_rows(24))
    write_jsonl(root / "eval.jsonl", extraction_rows(8, offset=100))
    results = {}
    for name, extra in RUNS.items():
        overrides = base_overrides(root, tiny_model_dir, name) + [f"method.name={method_of(name)}"] + extra
        if method_of(name) in ("lora", "qlora", "dora", "rslora", "adalora"):
            overrides.append("method.dropout=0.0")
        results[name] = run(load_config(None, overrides))
    return root, results


def losses(root, name):
    rows = [json.loads(line) for line in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# Virtual tokens have little leverage on a *random* tiny model, so their fall is smaller (but steady).
MIN_FALL = {"prompt_tuning": 0.01, "prefix_tuning": 0.01, "p_tuning": 0.01}


@pytest.mark.parametrize("name", list(RUNS))
def test_loss_falls(runs, name):
    root, _ = runs
    got = losses(root, name)
    assert len(got) == 10
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - MIN_FALL.get(name, 0.05), got


@pytest.mark.parametrize("name", list(RUNS))
def test_saved_output(runs, name, tiny_model_dir):
    _, results = runs
    out = results[name].adapter_dir
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["method"] == method_of(name)
    assert manifest["merge"] == methods.METHODS[method_of(name)].merge
    if name == "full":
        assert not (out / "adapter_config.json").exists()
        return
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE[name]
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    # Only adapter tensors are saved: far fewer numbers than the base model holds.
    assert 0 < sum(v.numel() for v in weights.values()) < 0.5 * manifest["training"]["total_parameters"]
    assert manifest["quantization"] == {"qlora": "4bit", "lora_8bit": "8bit"}.get(name, "none")


def test_full_finetune_writes_a_complete_model(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _, results = runs
    out = results["full"].adapter_dir
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in base.state_dict().items() if not torch.equal(p, tuned.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # every weight trained
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight  # still tied after the round trip
    assert results["full"].report["base"]["eval_loss"] != results["full"].report["tuned"]["eval_loss"]
    from llm_finetune.generate import load_for_inference

    with pytest.raises(FileNotFoundError, match="complete model.*--model"):
        load_for_inference(str(tiny_model_dir), str(out))


RELOAD = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    from llm_finetune.generate import generate_batch
    from llm_finetune.models import load_model
    base_dir, runs = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = torch.tensor([tok("Bo Chen, 31, lives in Oslo.")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    out = {}
    for name, path in runs.items():
        if name == "full":
            model = AutoModelForCausalLM.from_pretrained(path)
        else:
            q = {"qlora": "4bit", "lora_8bit": "8bit"}.get(name, "none")
            model = PeftModel.from_pretrained(load_model(base_dir, "float32", q), path)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
            # The project's generation path (prefix tuning's prefix must reach generate's cache).
            gen = generate_batch(model, tok, [ids[0].tolist()], [tok.eos_token_id], max_new_tokens=4)[0]
            # It is the greedy continuation of the reloaded model's own forward pass: generation runs the
            # tuned model, not the base.
            greedy, seq = [], ids
            while len(greedy) < 4:
                token = int(model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax())
                if token == tok.eos_token_id:
                    break
                greedy.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        expected = tok.decode(greedy, skip_special_tokens=True)
        out[name] = {"generated": [gen.text, gen.new_tokens], "greedy": [expected, len(greedy)],
                     "diff_from_base": float((logits - base_logits).abs().max())}
    print(json.dumps(out))
""")


def test_reload_in_fresh_process_and_generate(runs, tiny_model_dir):
    _, results = runs
    paths = {name: str(r.adapter_dir) for name, r in results.items()}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tiny_model_dir), json.dumps(paths)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in RUNS:
        assert got[name]["generated"] == got[name]["greedy"], name
        assert got[name]["diff_from_base"] > 1e-4, f"{name}: the reloaded output does not change the model"


def _load_tuned(run_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval()


@pytest.mark.parametrize("name", [n for n in RUNS if n != "full"])
def test_merge_rules(runs, name, tiny_model_dir):
    _, results = runs
    model = _load_tuned(results[name].adapter_dir, tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits[:, -ids.shape[1]:]
    if not methods.METHODS[method_of(name)].mergeable:
        with pytest.raises(MethodError, match="cannot be merged"):
            methods.merge_adapter(model)
        return
    merged = methods.merge_adapter(model)
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # the head stays tied


def test_full_needs_no_merge(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert methods.merge_adapter(model) is model
    assert not methods.METHODS["full"].mergeable and "needs no merge" in methods.METHODS["full"].merge


def test_adalora_ranks_are_pruned_over_training(runs, tiny_model_dir):
    _, results = runs
    out = results["adalora"].adapter_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["total_step"] == 10  # wired to the run's real step count
    pattern = config["rank_pattern"]
    assert pattern, "update_and_allocate never ran"
    kept = [sum(mask) for mask in pattern.values()]
    assert all(len(mask) == 6 for mask in pattern.values())
    assert sum(kept) < 6 * len(kept)  # some ranks were pruned
    assert sum(kept) <= 2 * len(kept) + 1  # to about target_r on average
    model = _load_tuned(out, tiny_model_dir)
    # Reloaded layers were resized to the kept ranks.
    e = {n: p for n, p in model.named_parameters() if "lora_E" in n}
    assert sorted(p.shape[0] for p in e.values()) == sorted(kept)


# ---------------------------------------------------------------------------------------------
# What each method builds, checked on the model itself


def _build(tiny_model_dir, tokenizer_dir=None, quantization="none", total_steps=20, **method):
    from transformers import AutoTokenizer

    from llm_finetune.config import MethodConfig

    cfg = MethodConfig(**method)
    q = methods.effective_quantization(cfg.name, quantization)
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), "float32", q)  # the product's loader: CPU 4-bit kernel limits applied
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return methods.apply_method(model, cfg, total_steps=total_steps, tokenizer=tok,
                                tokenizer_path=str(tiny_model_dir)), tok


def _batch(tok):
    texts = [json.dumps(r) for r in extraction_rows(4)]
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


def _snapshot(model):
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return state


@pytest.mark.parametrize("name", methods.METHODS)
def test_only_intended_parameters_change(tiny_model_dir, name):
    model, tok = _build(tiny_model_dir, name=name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tok)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, (sorted(changed ^ trainable))[:5]
    frozen = [n for n in before if n not in trainable]
    if name == "full":
        assert not frozen
    else:
        assert frozen and len(trainable) < len(before)
        for n in frozen:  # the base is untouched
            assert torch.equal(dict(model.named_parameters())[n], before[n]), n


def test_qlora_builds_4bit_nf4_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model, _ = _build(tiny_model_dir, name="qlora")
    layers = [m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of both blocks, the tied head excepted
    for layer in layers:
        state = layer.weight.quant_state
        assert state is not None and state.quant_type == "nf4" and state.nested  # double quantisation
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    # Parameter counts see through the packing (two 4-bit values per stored byte).
    from transformers import AutoModelForCausalLM

    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    trainable, total = methods.count_parameters(model)
    assert total - trainable == plain
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == len(layers) and all(p.requires_grad and p.dtype == torch.float32 for p in lora_a)


def test_8bit_base_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model, _ = _build(tiny_model_dir, name="lora", quantization="8bit")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14 and all(layer.weight.dtype == torch.int8 for layer in layers)


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    for name, expected in (("rslora", 16 / 4 ** 0.5), ("lora", 16 / 4)):
        model, _ = _build(tiny_model_dir, name=name, r=4, alpha=16)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(abs(m.scaling["default"] - expected) < 1e-9 for m in layers)


def test_dora_has_magnitude_vectors(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    model, _ = _build(tiny_model_dir, name="dora")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.shape == (layer.out_features,) and magnitude.requires_grad
        # Initialised to the column norms of the base weight, so the start equals the base model.
        torch.testing.assert_close(magnitude, layer.get_base_layer().weight.norm(p=2, dim=1))


def test_text_initialised_prompt_equals_the_text_embeddings(tiny_model_dir):
    text = "Extract name, age and city as JSON."
    model, tok = _build(tiny_model_dir, name="prompt_tuning", prompt_init_text=text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = model.prompt_encoder["default"].embedding.weight
    assert prompt.shape[0] == len(ids)  # num_virtual_tokens defaults to the text's length
    torch.testing.assert_close(prompt, model.get_input_embeddings()(torch.tensor(ids)))
    random_model, _ = _build(tiny_model_dir, name="prompt_tuning", num_virtual_tokens=len(ids))
    assert not torch.allclose(random_model.prompt_encoder["default"].embedding.weight, prompt)


def test_adalora_regulariser_is_in_the_loss(tiny_model_dir):
    model, tok = _build(tiny_model_dir, name="adalora", adalora_init_r=6, adalora_target_r=2)
    batch = _batch(tok)
    with torch.no_grad():
        # Make A and B non-orthogonal so the regulariser is clearly non-zero.
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.add_(0.3)
        total = model(**batch).loss
        plain = model.base_model.model(**batch).loss  # the transformer alone, no regulariser
    expected, count = 0.0, 0
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            expected += torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0]))
            count += 1
    assert float(expected) > 0
    torch.testing.assert_close(total - plain, 0.5 * expected / count, atol=1e-4, rtol=1e-4)


def test_adalora_allocator_runs_between_optimizer_step_and_zero_grad(tiny_model_dir, tmp_path, monkeypatch):
    """update_and_allocate scores ranks by |weight x gradient|: in a real Trainer loop it must run once per
    optimizer step, after the step and before zero_grad clears the gradients, with the step's number."""
    from datasets import Dataset
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import TrainingArguments

    from llm_finetune.callbacks import AdaLoraRankAllocator, training_callbacks
    from llm_finetune.data.collate import PaddingCollator
    from llm_finetune.trainer import FinetuneTrainer

    model, tok = _build(tiny_model_dir, name="adalora", adalora_init_r=4, adalora_target_r=2, total_steps=3)
    events = []
    allocate, zero_grad = model.base_model.update_and_allocate, model.zero_grad

    def recording_allocate(step):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        events.append(("allocate", step, all(g is not None and bool(g.abs().sum() > 0) for g in grads)))
        return allocate(step)

    monkeypatch.setattr(model.base_model, "update_and_allocate", recording_allocate)
    monkeypatch.setattr(model, "zero_grad", lambda *a, **k: (events.append(("zero_grad",)), zero_grad(*a, **k)))
    ids = [tok(json.dumps(r))["input_ids"] for r in extraction_rows(6)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3,
                             per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="no",
                             disable_tqdm=True)
    trainer = FinetuneTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        data_collator=PaddingCollator(tok.pad_token_id), callbacks=[AdaLoraRankAllocator(model)])
    handle = register_optimizer_step_post_hook(lambda *_: events.append(("step",)))
    try:
        trainer.train()
    finally:
        handle.remove()
    first_step = events.index(("step",))
    assert all(e == ("zero_grad",) for e in events[:first_step])  # only clearing before the first step
    assert [e[0] for e in events[first_step:]] == ["step", "allocate", "zero_grad"] * 3, events
    allocations = [e for e in events if e[0] == "allocate"]
    assert [e[1] for e in allocations] == [0, 1, 2]
    assert all(e[2] for e in allocations), "update_and_allocate ran without the step's gradients"
    cfg = load_config(None, ["output.tensorboard=false"])
    assert [type(c).__name__ for c in training_callbacks(cfg, model, tmp_path)] == ["MetricsLogger",
                                                                                   "AdaLoraRankAllocator"]
    lora, _ = _build(tiny_model_dir, name="lora")
    assert [type(c).__name__ for c in training_callbacks(cfg, lora, tmp_path)] == ["MetricsLogger"]


def test_head_trained_through_modules_to_save_stays_tied(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model, tok = _build(tiny_model_dir, name="lora", modules_to_save=["lm_head"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_batch(tok)).loss.backward()
    opt.step()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    torch.testing.assert_close(head.modules_to_save["default"].weight, emb.modules_to_save["default"].weight)
    model.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    vocab_rows = [k for k, v in saved.items() if v.shape[0] == len(tok) and "lora" not in k]
    assert 1 <= len(vocab_rows) <= 2  # the head (and its tied twin), never a base_layer copy
    merged = methods.merge_adapter(model.eval())
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_lora_on_a_tied_head_is_refused(tiny_model_dir):
    with pytest.raises(MethodError, match="modules_to_save"):
        _build(tiny_model_dir, name="lora", target_modules=["q_proj", "lm_head"])


def test_unknown_target_names_the_available_modules(tiny_model_dir):
    with pytest.raises(MethodError, match=r"\['qkv'\] match no module.*q_proj.*v_proj"):
        _build(tiny_model_dir, name="lora", target_modules=["qkv"])


# ---------------------------------------------------------------------------------------------
# Refusals before loading, and config rules


def _cfg(tmp_path, tiny_model_dir, *extra):
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(8))
    return load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
                              "data.eval_file=null", f"output.dir={tmp_path / 'ck'}",
                              f"output.logs_dir={tmp_path / 'logs'}", *extra])


def _no_model_load(monkeypatch):
    import llm_finetune.train as train

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(train, "load_model", refuse)


def test_missing_bitsandbytes_backend_refuses_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    import bitsandbytes.functional as F

    from llm_finetune.train import run

    def broken(*a, **k):
        raise RuntimeError("no native library for this device")

    monkeypatch.setattr(F, "quantize_4bit", broken)  # what a build without a CPU/CUDA backend does
    _no_model_load(monkeypatch)
    with pytest.raises(MethodError) as e:
        run(_cfg(tmp_path, tiny_model_dir, "method.name=qlora"))
    assert "bitsandbytes" in str(e.value) and "no working backend" in str(e.value)
    assert "model.quantization=none" in str(e.value)  # what to use instead
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()


def test_missing_bitsandbytes_package_refuses(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    assert "not installed" in methods.bitsandbytes_problem()


@pytest.mark.skipif(torch.cuda.is_available(), reason="paged optimizers run where CUDA is")
def test_paged_optimizer_refused_without_cuda(tmp_path, tiny_model_dir, monkeypatch):
    from llm_finetune.train import run

    _no_model_load(monkeypatch)
    with pytest.raises(MethodError, match="need CUDA.*adamw_8bit"):
        run(_cfg(tmp_path, tiny_model_dir, "train.optimizer=paged_adamw_8bit"))


@pytest.mark.parametrize("extra,match", [
    (["method.name=full", "model.quantization=4bit"], "quantised .* weights cannot be trained"),
    (["method.name=qlora", "model.quantization=8bit"], "qlora means a 4bit base"),
])
def test_impossible_combinations_refused(tmp_path, tiny_model_dir, extra, match):
    """Rules between keys are the config's: refused when it loads, before anything runs or is written."""
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, tiny_model_dir, *extra)


def test_option_of_another_method_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method.r does not apply to method.name='prompt_tuning'.*lora"):
        load_config(None, ["method.name=prompt_tuning", "method.r=32"])
    with pytest.raises(ConfigError, match="method.prompt_init_text does not apply"):
        load_config(None, ["method.name=prefix_tuning", "method.prompt_init_text=hello"])
    with pytest.raises(ConfigError, match="adalora_target_r"):
        load_config(None, ["method.name=adalora", "method.adalora_init_r=4", "method.adalora_target_r=8"])
    cfg = load_config(None, ["method.name=p_tuning", "method.num_virtual_tokens=10"])
    assert cfg.method.num_virtual_tokens == 10


def test_the_method_table_has_every_fact_for_every_method():
    """methods.METHODS is the one table of method facts: every name the config accepts has each of them,
    and config, merge rules and the card all read it."""
    import dataclasses
    from typing import get_args

    from llm_finetune.config import MethodConfig, MethodName, OptimizerName

    assert set(get_args(MethodName)) == set(methods.METHODS)
    option_keys = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    for name, m in methods.METHODS.items():
        assert m.name == name
        assert m.family in ("lora", "adalora", "ia3", "prompt", "full")
        assert (m.build is None) == (m.family == "full") == (m.peft_type is None)
        assert m.learning_rate > 0 and m.merge
        assert set(m.options) <= option_keys, set(m.options) - option_keys
        assert m.mergeable == (m.family not in ("prompt", "full"))
        assert m.merge.startswith("merges" if m.mergeable else ("needs no merge" if name == "full" else "cannot"))
        assert m.quantization in (None, "4bit", "8bit")
    # every method.* option is read by some method
    assert set(methods.option_readers()) == option_keys | {"name"}
    lrs = {n: m.learning_rate for n, m in methods.METHODS.items()}
    assert lrs["full"] < lrs["lora"] < lrs["prompt_tuning"]  # orders of magnitude apart
    assert MethodConfig().name == "lora"
    # refusing to merge is decided by PEFT type, so adapters made elsewhere are covered too
    assert methods.merge_refusal("MULTITASK_PROMPT_TUNING") and methods.merge_refusal("LORA") is None
    assert set(methods.OPTIMIZERS) == set(get_args(OptimizerName))


def test_continue_from_an_existing_adapter(runs, tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    _, results = runs
    start = results["lora"].adapter_dir
    cfg = _cfg(tmp_path, tiny_model_dir, f"method.init_adapter={start}", "train.max_steps=2",
               "method.dropout=0.0")
    out = run(cfg).adapter_dir
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(MethodError, match="holds a LORA adapter"):
        run(_cfg(tmp_path, tiny_model_dir, "method.name=ia3", f"method.init_adapter={start}"))


@pytest.mark.parametrize("name", ["qlora", "prompt_tuning"])
def test_gradient_checkpointing_on_adapter_methods(tmp_path, tiny_model_dir, name):
    """Checkpointing through a frozen (here 4-bit) base must still reach the adapter's parameters."""
    from llm_finetune.train import run

    cfg = _cfg(tmp_path, tiny_model_dir, f"method.name={name}", "train.gradient_checkpointing=true",
               "train.max_steps=3", "train.warmup_ratio=0", "train.logging_steps=1",
               f"train.learning_rate={ {'qlora': 1e-2, 'prompt_tuning': 1e-1}[name]}")
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows if "loss" in r]
    assert len(got) == 3 and got[-1] < got[0]


def test_ia3_targets_and_feedforward_modules(tiny_model_dir):
    from peft.tuners.ia3 import IA3Layer

    model, _ = _build(tiny_model_dir, name="ia3")  # all-linear = IA3's recipe: k, v, and the MLP output
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}
    assert set(layers) == {"k_proj", "v_proj", "down_proj"}
    assert layers["down_proj"].is_feedforward and not layers["k_proj"].is_feedforward
    with pytest.raises(ConfigError, match="subset"):
        load_config(None, ["method.name=ia3", 'method.target_modules=["q_proj"]',
                           'method.ia3_feedforward_modules=["down_proj"]'])

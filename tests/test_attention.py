"""Padding-free packing: the collator loses no token, each example inside a packed row computes exactly
what it computes alone, no mask is made, and a packed run trains as a padded one does."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import extraction_rows, write_jsonl

from llm_finetune.config import load_config
from llm_finetune.data.collate import PaddingCollator, PaddingFreeCollator
from llm_finetune.errors import ConfigError


def _features(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(10, 500) for _ in range(n)]
        prompt = n // 2
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _model(tiny_model_dir, lora: bool = False):
    from transformers import AutoModelForCausalLM

    from llm_finetune import methods
    from llm_finetune.config import MethodConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if lora:
        model = methods.apply_method(model, MethodConfig(name="lora", dropout=0.0))
        for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter do something
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_the_collator_loses_and_duplicates_no_token():
    features = _features([5, 1, 9, 3, 7])
    batch = PaddingFreeCollator()(features)
    ids, labels, positions = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0]
    assert ids == [t for f in features for t in f["input_ids"]]  # every token once, in order
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 6, 15, 18, 25] == batch["cu_seq_lens_k"].tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == 9
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    for i, f in enumerate(features):
        s, e = starts[i], starts[i] + len(f["input_ids"])
        assert positions[s:e].tolist() == list(range(len(f["input_ids"])))
        assert labels[s] == -100  # nothing learns to predict an example's first token from the one before
        assert labels[s + 1:e] == f["labels"][1:]  # every other label kept exactly
    assert "attention_mask" not in batch


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_each_example_in_a_packed_row_has_its_logits_alone(tiny_model_dir, lora):
    from llm_finetune.attention import use_padding_free_attention

    model = _model(tiny_model_dir, lora)
    features = _features([7, 1, 30, 12, 2])
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features]
        assert use_padding_free_attention(model) is None
        packed = PaddingFreeCollator()(features)
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
    bounds = packed["cu_seq_lens_q"].tolist()
    for i, expected in enumerate(alone):
        torch.testing.assert_close(logits[bounds[i]:bounds[i + 1]], expected, rtol=1e-5, atol=1e-5)


def test_a_packed_forward_makes_no_mask_and_padded_batches_still_get_theirs(tiny_model_dir, monkeypatch):
    from llm_finetune import attention

    model = _model(tiny_model_dir)
    features = _features([6, 11, 4])
    with torch.no_grad():
        padded = PaddingCollator(0)(features)
        expected = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert attention.use_padding_free_attention(model) is None
        made = []
        real_mask = attention.sdpa_mask
        monkeypatch.setattr(attention, "sdpa_mask", lambda *a, **k: made.append(1) or real_mask(*a, **k))
        model(**{k: v for k, v in PaddingFreeCollator()(features).items() if k != "labels"})
        assert made == []  # no (tokens x tokens) mask for a packed row
        got = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert made  # a padded batch is masked as stock sdpa masks it
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_generation_is_unchanged_by_the_switch(tiny_model_dir):
    from llm_finetune.attention import use_padding_free_attention

    model = _model(tiny_model_dir)
    prompt = torch.tensor([[11, 52, 93, 7, 300], [0, 0, 41, 8, 77]])  # the second row left-padded
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    before = model.generate(prompt, **kwargs)
    use_padding_free_attention(model)
    assert torch.equal(model.generate(prompt, **kwargs), before)


def test_packing_defaults_on_where_the_method_can_and_refuses_where_it_cannot(tiny_model_dir):
    base = [f"model.name_or_path={tiny_model_dir}"]
    assert load_config(None, base).resolved().train.packing is True
    for name in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        cfg = load_config(None, [*base, f"method.name={name}"])
        assert cfg.resolved().train.packing is False, name
        with pytest.raises(ConfigError, match=f"train.packing=true cannot train method.name={name}"):
            load_config(None, [*base, f"method.name={name}", "train.packing=true"])


def _run(root, model_dir, name, packing, extra=()):
    from llm_finetune.train import run

    out = root / name
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}", "data.eval_file=null",
        "data.max_length=128", "method.dropout=0.0", "train.learning_rate=5e-3", "train.warmup_ratio=0",
        "train.max_steps=4", "train.logging_steps=1", "train.batch_size=4", f"train.packing={packing}",
        f"output.dir={out / 'ck'}", f"output.logs_dir={out / 'logs'}", "output.tensorboard=false", *extra])
    result = run(cfg)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in rows if "loss" in r]


def test_a_packed_run_trains_as_a_padded_one(tmp_path, tiny_model_dir):
    """Same examples per step, same loss at every step, the same adapter; every input token counted once."""
    from safetensors.torch import load_file

    rows = extraction_rows(16)
    for i, row in enumerate(rows):  # lengths that differ, so padded rows carry real padding
        row["output"] += " ok" * (3 * i)
    write_jsonl(tmp_path / "train.jsonl", rows)
    packed, packed_log = _run(tmp_path, tiny_model_dir, "packed", "true")
    padded, padded_log = _run(tmp_path, tiny_model_dir, "padded", "false")
    assert [r["step"] for r in packed_log] == [1, 2, 3, 4]
    for a, b in zip(packed_log, padded_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # The padded run counts its attention mask; the packed one has none (and its rows hold the pad
        # token, <|im_end|>, as text): every real token still counts once.
        assert a["num_input_tokens_seen"] == b["num_input_tokens_seen"]
    assert packed_log[-1]["loss"] < packed_log[0]["loss"]
    assert json.loads((packed.adapter_dir / "run_config.json").read_text())["train"]["packing"] is True
    a = load_file(packed.adapter_dir / "adapter_model.safetensors")
    b = load_file(padded.adapter_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)

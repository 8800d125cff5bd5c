"""The arithmetic of a training step: warmup_ratio is a ratio, and gradient accumulation changes neither
the loss nor the gradients (plain LoRA, and AdaLoRA with its orthogonality regulariser)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import extraction_rows, write_jsonl

from llm_finetune.config import load_config

# ---------------------------------------------------------------------------------------------
# Item 10: train.warmup_ratio


def _learning_rates(tmp_path, tiny_model_dir, ratio: float, steps: int, scheduler: str = "linear") -> list[float]:
    """The learning rate of each optimizer step, from the Trainer's own optimizer and scheduler."""
    from transformers import AutoModelForCausalLM, Trainer

    from llm_finetune.trainer import training_arguments

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"train.warmup_ratio={ratio}",
                             f"train.lr_scheduler={scheduler}", f"output.dir={tmp_path / 'ck'}"])
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                      args=training_arguments(cfg, steps, 1.0))
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return rates


@pytest.mark.parametrize("ratio,steps,warmup", [(0.0, 10, 0), (0.07, 100, 7), (0.1, 10, 1), (1.0, 10, 10),
                                                (0.05, 10, 1)])
def test_warmup_ratio_is_a_ratio_for_every_value(tmp_path, tiny_model_dir, ratio, steps, warmup):
    from llm_finetune.trainer import warmup_step_count

    assert warmup_step_count(ratio, steps) == warmup  # ceil(ratio x steps), rounding noise aside
    rates = _learning_rates(tmp_path, tiny_model_dir, ratio, steps)
    # Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `steps`.
    expected = [i / warmup if i < warmup else (steps - i) / (steps - warmup) for i in range(steps)]
    assert rates == pytest.approx(expected, abs=1e-9), rates
    if ratio == 1.0:  # the whole run warms up: the rate rises at every step and never reaches the peak
        assert all(b > a for a, b in zip(rates, rates[1:])) and max(rates) < 1.0


# ---------------------------------------------------------------------------------------------
# Item 5: gradient accumulation


def _one_sgd_step(root, model_dir, name: str, batch: int, accumulation: int, method: list[str]):
    """One optimizer step of plain SGD (lr 1, no clipping, no warmup) over the same 8 examples through
    the real entry point; returns the saved adapter tensors and the logged loss."""
    from safetensors.torch import load_file

    from llm_finetune.train import run

    out = root / name
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}", "data.eval_file=null",
        "data.max_length=128", "method.dropout=0.0", "train.optimizer=sgd", "train.learning_rate=1.0",
        "train.max_grad_norm=0", "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.max_steps=1",
        "train.logging_steps=1", f"train.batch_size={batch}", f"train.gradient_accumulation_steps={accumulation}",
        f"output.dir={out / 'ck'}", f"output.logs_dir={out / 'logs'}", *method])
    result = run(cfg)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    (loss,) = [r["loss"] for r in rows if "loss" in r]
    return load_file(result.adapter_dir / "adapter_model.safetensors"), loss


ADALORA = ["method.name=adalora", "method.adalora_init_r=4", "method.adalora_target_r=2",
           "method.adalora_orth_reg_weight=0.5"]


@pytest.mark.parametrize("packing", ["true", "false"], ids=["packed", "padded"])
@pytest.mark.parametrize("method", [["method.name=lora"], ADALORA], ids=["lora", "adalora"])
def test_accumulation_gives_the_same_step(tmp_path, tiny_model_dir, method, packing):
    """(batch 8, accumulation 1) and (batch 2, accumulation 4) on the same 8 examples of different
    lengths: the same loss and, after one SGD step at lr 1, the same weights, i.e. the same gradients.
    The loss is token-weighted over the accumulated batch (the Trainer's num_items_in_batch)."""
    rows = extraction_rows(8)
    for i, row in enumerate(rows):  # lengths that differ a lot, so a per-micro-batch mean would differ
        row["output"] = row["output"] + " ok" * (7 * i)
    write_jsonl(tmp_path / "train.jsonl", rows)
    method = [*method, f"train.packing={packing}"]
    whole, whole_loss = _one_sgd_step(tmp_path, tiny_model_dir, "whole", 8, 1, method)
    split, split_loss = _one_sgd_step(tmp_path, tiny_model_dir, "split", 2, 4, method)
    assert whole_loss == pytest.approx(split_loss, abs=1e-5)
    assert whole.keys() == split.keys()
    trained = [k for k in whole if "lora_B" in k or "lora_A" in k]
    assert trained
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], atol=1e-5, rtol=0, msg=key)


def test_adalora_regulariser_counts_once_per_optimizer_step(tiny_model_dir):
    """With accumulation k, each micro-batch carries 1/k of the orthogonality term (and the weight in the
    config is left as it was)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from llm_finetune import methods
    from llm_finetune.config import MethodConfig
    from llm_finetune.trainer import FinetuneTrainer

    torch.manual_seed(0)
    model = methods.apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                 MethodConfig(name="adalora", dropout=0.0, adalora_init_r=4, adalora_target_r=2),
                                 total_steps=10)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", gradient_accumulation_steps=4)
    trainer = FinetuneTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 4
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    with torch.no_grad():
        plain = model.base_model.model(**batch).loss  # the transformer alone
        shared = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(5))
        full = model(**batch).loss  # PEFT's own forward: cross-entropy (per-row mean) + 0.5 x R
        ce_share = float(model.base_model.model(**batch, num_items_in_batch=torch.tensor(5)).loss)
    regulariser = float(full - plain)
    assert regulariser > 0
    assert float(shared) == pytest.approx(ce_share + regulariser / 4, abs=1e-6)
    assert model.peft_config["default"].orth_reg_weight == 0.5


# ---------------------------------------------------------------------------------------------
# Speed levers: logits only where a token is trained, length-grouped batches


def _lora_trainer(tiny_model_dir, tmp_path, name="lora"):
    from transformers import AutoModelForCausalLM

    from llm_finetune import methods
    from llm_finetune.config import MethodConfig
    from llm_finetune.trainer import FinetuneTrainer, training_arguments

    torch.manual_seed(0)
    options = {"dropout": 0.0} if name != "ia3" else {}
    model = methods.apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MethodConfig(name=name, **options))
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"output.dir={tmp_path / 'ck'}"])
    return FinetuneTrainer(model=model, args=training_arguments(cfg, 10, 1e-3)), model


def _padded_batch():
    """Two rows of different length: prompt tokens (-100), trained tokens, right padding (-100)."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64, 0, 0], [9, 8, 7, 6, 5, 4, 3, 2, 1, 12]])
    labels = torch.tensor([[-100, -100, -100, 99, 7, 3, 11, 64, -100, -100], [-100] * 6 + [3, 2, 1, 12]])
    mask = torch.tensor([[1] * 8 + [0, 0], [1] * 10])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("name", ["lora", "ia3"])
@pytest.mark.parametrize("num_items", [None, 13])
@pytest.mark.parametrize("chunked", [True, False], ids=["head-in-chunks", "head-in-one-piece"])
def test_logits_where_trained_give_the_same_loss_and_gradients(tiny_model_dir, tmp_path, monkeypatch, name, num_items,
                                                               chunked):
    """The output head and loss only at trained positions equal the model's own loss and gradients: in chunks
    (here 4 + 4 + 1 of the 9 trained tokens, the head module itself run on no position), or in one piece at
    the 7 positions trained in some row (an architecture whose head is not a plain linear layer)."""
    from llm_finetune import head_loss

    monkeypatch.setattr(head_loss, "chunk_tokens", lambda vocabulary: 4)
    if not chunked:
        monkeypatch.setattr(head_loss, "PLAIN_HEAD", set())
    trainer, model = _lora_trainer(tiny_model_dir, tmp_path, name)
    model.train()
    batch = _padded_batch()
    n = None if num_items is None else torch.tensor(num_items)

    head_positions = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_positions.append(out.shape[1]))
    chunks = []
    real_apply = head_loss.ChunkedHeadCrossEntropy.apply
    monkeypatch.setattr(head_loss.ChunkedHeadCrossEntropy, "apply",
                        lambda hidden, *rest: chunks.append(hidden.shape[0]) or real_apply(hidden, *rest))

    def loss_and_grads(where_trained: bool):
        model.zero_grad()
        trainer.logits_where_trained = where_trained
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads(False)  # the model's own loss: logits at every position
    kept_loss, kept_grads = loss_and_grads(True)
    # positions 2..8 predict a trained token in some row (7 of 10); 5 + 4 tokens are trained
    assert head_positions == ([10, 0] if chunked else [10, 7]), head_positions
    assert chunks == ([9] if chunked else [])
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert full_grads.keys() == kept_grads.keys() and full_grads
    for k in full_grads:
        torch.testing.assert_close(kept_grads[k], full_grads[k], rtol=1e-5, atol=1e-7)


def test_the_chunked_head_adds_no_error_under_bf16_autocast(tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 frozen base under autocast (what model.dtype=auto gives on a CPU with AVX512-BF16): against the
    fp32 model's own gradients, the chunked head is as close as the one-piece head (bf16's rounding, not the
    chunking, is the difference), and the losses agree."""
    from llm_finetune import head_loss

    monkeypatch.setattr(head_loss, "chunk_tokens", lambda vocabulary: 4)
    trainer, model = _lora_trainer(tiny_model_dir, tmp_path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)  # off zero, so lora_A has a gradient too
    model.train()

    def loss_and_grads(where_trained: bool, autocast: bool):
        model.zero_grad()
        trainer.logits_where_trained = where_trained
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = trainer.compute_loss(model, _padded_batch())
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    truth_loss, truth = loss_and_grads(False, autocast=False)  # fp32, the model's own loss
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    monkeypatch.setattr(head_loss, "PLAIN_HEAD", set())
    one_loss, one = loss_and_grads(True, autocast=True)
    monkeypatch.undo()
    monkeypatch.setattr(head_loss, "chunk_tokens", lambda vocabulary: 4)
    chunked_loss, chunked = loss_and_grads(True, autocast=True)
    torch.testing.assert_close(chunked_loss, one_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(chunked_loss, truth_loss, rtol=2e-2, atol=1e-3)

    def error(grads):  # the largest gradient error, relative to the parameter's largest true gradient
        return max(float((grads[k] - truth[k]).abs().max() / truth[k].abs().max()) for k in truth)

    assert error(chunked) <= 1.05 * error(one) + 1e-4, (error(chunked), error(one))


def test_logits_where_trained_is_on_only_for_methods_that_keep_the_sequence(tiny_model_dir, tmp_path):
    """Prompt-learning methods prepend virtual tokens (positions shift) and AdaLoRA adds its regulariser
    to the model's own loss: both keep the full computation."""
    from llm_finetune.data.prepare import PreparedData
    from llm_finetune.data.tokenize import Encoded, EncodeStats
    from llm_finetune.models import load_tokenizer
    from llm_finetune.trainer import build_trainer

    tok = load_tokenizer(str(tiny_model_dir))
    rows = [Encoded([5, 6, 7, 8], [-100, -100, 7, 8], "x:1", False, 4)]
    data = PreparedData(None, rows, EncodeStats(examples=1, kept=1, tokens=4, trained_tokens=2))
    for name, expected in [("lora", True), ("ia3", True), ("adalora", False), ("prompt_tuning", False)]:
        options = ["method.num_virtual_tokens=2"] if name == "prompt_tuning" else []
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"method.name={name}", *options,
                                 f"output.dir={tmp_path / 'ck'}", "output.tensorboard=false"])
        from transformers import AutoModelForCausalLM

        from llm_finetune import methods

        model = methods.apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg.method, total_steps=10,
                                     tokenizer=tok, tokenizer_path=str(tiny_model_dir))
        trainer = build_trainer(cfg, model, tok, data, 10, 1e-3, tmp_path / "logs")
        assert trainer.logits_where_trained is expected, name


def test_length_grouped_batches_carry_less_padding(tiny_model_dir, tmp_path):
    """train.group_by_length (the default) batches similar lengths together: the same rows, in the same
    count, with far less padding than the plain shuffled order."""
    import random

    from llm_finetune.data.prepare import PreparedData
    from llm_finetune.data.tokenize import Encoded, EncodeStats
    from llm_finetune.models import load_tokenizer
    from llm_finetune.trainer import build_trainer

    tok = load_tokenizer(str(tiny_model_dir))
    rng = random.Random(0)
    lengths = [rng.randint(4, 200) for _ in range(128)]
    rows = [Encoded([5] * n, [-100] + [5] * (n - 1), f"x:{i}", False, n) for i, n in enumerate(lengths)]
    data = PreparedData(None, rows, EncodeStats(examples=128, kept=128, tokens=sum(lengths), trained_tokens=0))

    def padding(group: bool) -> tuple[float, list[int]]:
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"train.group_by_length={str(group).lower()}", "train.packing=false",
                                 "train.batch_size=8", f"output.dir={tmp_path / 'ck'}", "output.tensorboard=false"])
        from transformers import AutoModelForCausalLM

        trainer = build_trainer(cfg, AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, data, 16, 1e-3,
                                tmp_path / "logs")
        seen, padded = [], 0
        for batch in trainer.get_train_dataloader():
            real = batch["attention_mask"].sum(dim=1)
            seen += real.tolist()
            padded += int(batch["attention_mask"].numel() - real.sum())
        return padded / sum(lengths), sorted(seen)

    grouped, seen_grouped = padding(True)
    shuffled, seen_shuffled = padding(False)
    assert seen_grouped == seen_shuffled == sorted(lengths)  # every row once, none lost or repeated
    assert grouped < 0.4 * shuffled, (grouped, shuffled)  # measured 0.20 vs 0.71 of the real tokens

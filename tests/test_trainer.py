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


@pytest.mark.parametrize("method", [["method.name=lora"], ADALORA], ids=["lora", "adalora"])
def test_accumulation_gives_the_same_step(tmp_path, tiny_model_dir, method):
    """(batch 8, accumulation 1) and (batch 2, accumulation 4) on the same 8 examples of different
    lengths: the same loss and, after one SGD step at lr 1, the same weights, i.e. the same gradients.
    The loss is token-weighted over the accumulated batch (the Trainer's num_items_in_batch)."""
    rows = extraction_rows(8)
    for i, row in enumerate(rows):  # lengths that differ a lot, so a per-micro-batch mean would differ
        row["output"] = row["output"] + " ok" * (7 * i)
    write_jsonl(tmp_path / "train.jsonl", rows)
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

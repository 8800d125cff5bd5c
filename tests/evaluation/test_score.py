"""Metrics on small hand-checked cases."""

from __future__ import annotations

import pytest
import torch

from llm_finetune.evaluation.score import exact_match, json_match, paired_difference_interval, wilson_interval


def test_exact_match():
    assert exact_match(' {"a": 1} \n', '{"a": 1}')
    assert not exact_match('{"a": 2}', '{"a": 1}')


def test_json_match_checks_format_and_keys():
    ref = '{"name": "A", "age": 3, "city": "B"}'
    assert json_match('{"name": "X", "age": 9, "city": "Y"}', ref)
    assert not json_match('{"name": "X", "age": 9}', ref)
    assert not json_match("name: X", ref)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_paired_difference_interval():
    same = [True, False] * 20
    assert paired_difference_interval(same, same) == (0.0, 0.0)
    lo, hi = paired_difference_interval([False] * 40, [True] * 30 + [False] * 10)
    assert 0.55 < lo <= 0.75 <= hi < 0.9


# ---------------------------------------------------------------------------------------------
# Scoring runs the output head only where a token is trained


def _rows_with_prompts_and_padding():
    """Three rows of different length: prompt tokens (-100) and trained tokens; the collator right-pads them."""
    return [{"input_ids": [5, 17, 42, 99, 7, 3, 11, 64], "labels": [-100, -100, -100, 99, 7, 3, 11, 64]},
            {"input_ids": [9, 8, 7, 6, 5, 4, 3, 2, 1, 12], "labels": [-100] * 6 + [3, 2, 1, 12]},
            {"input_ids": [4, 4, 8, 15, 16], "labels": [-100, -100, -100, 15, 16]}]


def _full_head_sums(model, rows):
    """The reference: every position's logits, then cross-entropy over the trained tokens of each row."""
    from llm_finetune.data.collate import PaddingCollator

    batch = PaddingCollator(0)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logits = logits[:, -batch["labels"].shape[1]:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    return loss.view(len(rows), -1).sum(dim=1).tolist()


@pytest.mark.parametrize("case, head_rows", [("chunked", [0]), ("one-piece", [7]), ("bf16-base", [0]),
                                             ("prompt-tuning", [13])])
def test_scoring_runs_the_head_only_where_tokens_are_trained(tiny_model_dir, monkeypatch, case, head_rows):
    """Per-example losses of `example_losses` equal the full head's, while the head sees only trained
    positions: a plain head in chunks (the head module itself runs on no position; 3 chunks of 4, 4, 3 of
    the 11 trained tokens), another head at the 7 positions trained in some row; with prompt tuning
    (3 virtual tokens before the 10 positions) every position, as before. The bf16 base keeping fp32 activations
    (model.dtype auto on a CPU with bf16 units) computes its head products alike both ways."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llm_finetune import head_loss
    from llm_finetune.evaluation.score import example_losses
    from llm_finetune.models import keep_activations_fp32

    monkeypatch.setattr(head_loss, "chunk_tokens", lambda vocabulary: 4)
    if case == "one-piece":
        monkeypatch.setattr(head_loss, "PLAIN_HEAD", set())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16 if case == "bf16-base" else None)
    if case == "bf16-base":
        keep_activations_fp32(model)
    if case == "prompt-tuning":
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.eval()
    rows = _rows_with_prompts_and_padding()
    reference = _full_head_sums(model, rows)
    head = model.get_output_embeddings()
    seen, chunks = [], []
    head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    real_linear = torch.nn.functional.linear  # the chunks: products with the head's weight outside the module
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (
        chunks.append(x.shape[0]) if w.shape == head.weight.shape and x.dim() == 2 else None) or real_linear(x, w, b))
    sums, counts = example_losses(model, rows, pad_token_id=0, batch_size=3)
    assert counts == [5, 4, 2]
    assert sums == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert seen == head_rows
    assert chunks == ([4, 4, 3] if case in ("chunked", "bf16-base") else [])

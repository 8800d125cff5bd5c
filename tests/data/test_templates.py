"""Built-in templates: exact masks, special tokens added and trained, and the same prompt at inference."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, extraction_rows, write_jsonl
from generation_helpers import greedy_continuation
from test_masks import masked_text, trained_text

from llm_finetune.config import load_config
from llm_finetune.data.records import Example, alpaca_to_messages
from llm_finetune.data.templates import TEMPLATES, apply_template
from llm_finetune.data.tokenize import ChatEncoder, TemplateError

ROW = {"system": "你是助手。", "history": [["你好", "你好！"]], "instruction": "Capital of France?", "output": "Paris."}


@pytest.fixture
def fresh_tokenizer(tmp_path):
    """A tokenizer of its own (templates change the tokenizer in place)."""
    return build_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("name,trained,added", [
    ("chatml", ["你好！<|im_end|>", "Paris.<|im_end|>"], []),
    ("llama3", ["你好！<|eot_id|>", "Paris.<|eot_id|>"], []),
    ("mistral", [" 你好！<|im_end|>", " Paris.<|im_end|>"], []),  # the test tokenizer's EOS is <|im_end|>
    ("gemma", ["你好！<end_of_turn>", "Paris.<end_of_turn>"], ["<start_of_turn>", "<end_of_turn>"]),
    ("alpaca", ["你好！<|im_end|>", "Paris.<|im_end|>"], []),
])
def test_builtin_template_masks(fresh_tokenizer, name, trained, added):
    tok = fresh_tokenizer
    assert apply_template(tok, name) == added
    for token in added:  # each added marker is one special token now
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    encoder = ChatEncoder(tok)
    enc = encoder.encode(Example(alpaca_to_messages(ROW), "t:1", "alpaca"))
    assert trained_text(tok, enc) == trained
    masked = masked_text(tok, enc)
    assert "你是助手。" in masked and "Capital of France?" in masked and "Paris." not in masked
    # Training ids begin with exactly the ids of the inference prompt.
    prompt = encoder.encode_prompt(alpaca_to_messages(ROW)[:-1])
    assert enc.input_ids[: len(prompt)] == prompt


def test_alpaca_prompt_text(fresh_tokenizer):
    apply_template(fresh_tokenizer, "alpaca")
    text = ChatEncoder(fresh_tokenizer).prompt_text([{"role": "user", "content": "Say hi."}])
    assert text == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_template_errors(tmp_path):
    tok = build_tokenizer(tmp_path / "a")
    with pytest.raises(TemplateError, match="unknown template 'vicuna'.*chatml"):
        apply_template(tok, "vicuna")
    no_eos = build_tokenizer(tmp_path / "b", eos=None, pad=None)
    with pytest.raises(TemplateError, match="has none"):
        apply_template(no_eos, "alpaca")
    assert set(TEMPLATES) >= {"chatml", "llama3", "mistral", "gemma", "alpaca"}


def test_added_tokens_are_trained_saved_and_inference_prompt_is_byte_identical(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    """gemma's markers are new to this tokenizer: added, embeddings resized, rows trained and saved."""
    from llm_finetune.data.prepare import prepare_data
    from llm_finetune.generate import generate_batch, load_for_inference
    from llm_finetune.models import load_tokenizer
    from llm_finetune.train import run

    monkeypatch.setenv("LLM_FINETUNE_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "train.jsonl", extraction_rows(16))
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train_file={tmp_path / 'train.jsonl'}",
        "data.eval_file=null", "data.template=gemma", "data.max_length=128", "method.dropout=0.0",
        "train.learning_rate=0.01", "train.max_steps=4", "train.batch_size=8", "train.warmup_ratio=0.0",
        f"output.dir={tmp_path / 'ck'}", f"output.logs_dir={tmp_path / 'logs'}",
    ])
    result = run(cfg)
    adapter = result.adapter_dir
    log = (tmp_path / "logs" / "training.log").read_text()
    assert "added special tokens ['<start_of_turn>', '<end_of_turn>']" in log and "trained and saved" in log
    assert result.manifest["data"]["template"] == "gemma"
    assert result.manifest["data"]["added_tokens"] == ["<start_of_turn>", "<end_of_turn>"]

    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    rows = [v for k, v in weights.items() if "trainable_tokens" in k]
    assert rows and rows[0].shape[0] == 2  # the two new rows, saved with the adapter
    assert not [k for k in weights if "embed_tokens" in k and "trainable_tokens" not in k]  # not the whole matrix

    # The training-time prompt, rebuilt exactly as training did it.
    train_tok = load_tokenizer(str(tiny_model_dir))
    train_encoder = prepare_data(cfg, train_tok).encoder
    messages = [{"role": "user", "content": "Extract name, age and city as JSON.\n\nBo Chen, 31, lives in Oslo."}]

    model, tok = load_for_inference(str(tiny_model_dir), str(adapter))
    infer_encoder = ChatEncoder(tok)  # what `llm-finetune generate` builds
    assert infer_encoder.prompt_text(messages).encode() == train_encoder.prompt_text(messages).encode()
    assert infer_encoder.encode_prompt(messages) == train_encoder.encode_prompt(messages)
    assert tok.chat_template == TEMPLATES["gemma"].jinja
    assert infer_encoder.end_of_turn == "<end_of_turn>"

    # The new rows at inference are the trained ones, whatever the resize initialised them to.
    new_ids = torch.tensor(tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]))
    again, _ = load_for_inference(str(tiny_model_dir), str(adapter))
    with torch.no_grad():
        a = model.get_input_embeddings()(new_ids)
        b = again.get_input_embeddings()(new_ids)
    assert torch.equal(a, b)
    # Generation with the added tokens is the model's own greedy continuation, and stops at <end_of_turn>.
    eos_ids = infer_encoder.generation_eos_ids()
    assert tok.convert_tokens_to_ids("<end_of_turn>") in eos_ids
    ids = infer_encoder.encode_prompt(messages)
    gen = generate_batch(model, tok, [ids], eos_ids, max_new_tokens=3)[0]
    expected = greedy_continuation(model, ids, eos_ids, 3)
    assert gen.new_tokens == len(expected) and gen.text == tok.decode(expected, skip_special_tokens=True)
    assert gen.stopped == (len(expected) < 3)


def test_untied_output_head_trains_the_new_rows_too(tmp_path, fresh_tokenizer):
    """With separate input and output embeddings, both get the new rows trained (and only those)."""
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM

    from llm_finetune.config import MethodConfig
    from llm_finetune.methods import apply_method

    build_tiny_llama(tmp_path / "untied", fresh_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "untied", tie_word_embeddings=False)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    added = apply_template(fresh_tokenizer, "gemma")
    ids = fresh_tokenizer.convert_tokens_to_ids(added)
    model.resize_token_embeddings(len(fresh_tokenizer))
    peft_model = apply_method(model, MethodConfig(), trainable_token_indices=ids)
    assert peft_model.peft_config["default"].trainable_token_indices == {"embed_tokens": ids, "lm_head": ids}
    batch = torch.tensor([[ids[0], 5, 6, ids[1]]])
    peft_model(input_ids=batch, labels=batch).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n}
    assert sorted(grads) == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
                             "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())

"""Golden label masks: only assistant replies and their end-of-turn token are trained."""

from __future__ import annotations

import pytest

from llm_finetune.data.records import Example, alpaca_to_messages, chat_to_messages
from llm_finetune.data.tokenize import IGNORE_INDEX, ChatEncoder, Encoded, Skipped


def trained_text(tok, enc: Encoded) -> list[str]:
    """The trained tokens, decoded, as contiguous runs."""
    runs, current = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == i
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def masked_text(tok, enc: Encoded) -> str:
    return tok.decode([i for i, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])


def ex(messages, fmt="messages"):
    return Example(messages=messages, source="test:1", format=fmt)


ALPACA_ZH = {"instruction": "将下面的句子翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."}

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi, 你好?"},
    {"role": "assistant", "content": "Hello! 你好。"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def test_alpaca_chatml_golden(chatml_tokenizer):
    tok = chatml_tokenizer
    enc = ChatEncoder(tok).encode(ex(alpaca_to_messages(ALPACA_ZH), "alpaca"))
    assert trained_text(tok, enc) == ["The weather is nice today.<|im_end|>"]
    assert masked_text(tok, enc) == (
        "<|im_start|>user\n将下面的句子翻译成英文。\n\n今天天气很好。<|im_end|>\n<|im_start|>assistant\n"
    )
    # The end-of-turn token is trained although pad == EOS here.
    assert tok.pad_token_id == tok.eos_token_id
    assert enc.labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_multi_turn_chatml_golden(chatml_tokenizer):
    tok = chatml_tokenizer
    enc = ChatEncoder(tok).encode(ex(chat_to_messages({"messages": CHAT})))
    assert trained_text(tok, enc) == ["Hello! 你好。<|im_end|>", "Paris.<|im_end|>"]
    assert masked_text(tok, enc) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi, 你好?<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_llama3_golden(llama3_tokenizer):
    tok = llama3_tokenizer
    enc = ChatEncoder(tok).encode(ex(chat_to_messages({"messages": CHAT})))
    assert trained_text(tok, enc) == ["Hello! 你好。<|eot_id|>", "Paris.<|eot_id|>"]
    # Exactly one BOS: the template writes it, the tokenizer must not add another.
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert enc.input_ids.count(bos) == 1 and enc.input_ids[0] == bos


def test_no_special_token_doubled(chatml_tokenizer):
    tok = chatml_tokenizer
    enc = ChatEncoder(tok).encode(ex(chat_to_messages({"messages": CHAT})))
    start = tok.convert_tokens_to_ids("<|im_start|>")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids.count(start) == len(CHAT)
    assert enc.input_ids.count(end) == len(CHAT)  # trailing newline after the last one is dropped


@pytest.mark.parametrize("tokenizer_fixture", ["chatml_tokenizer", "llama3_tokenizer"])
def test_training_ids_extend_inference_prompt(request, tokenizer_fixture):
    """The ids trained on equal the ids the template gives at inference, plus the answer."""
    tok = request.getfixturevalue(tokenizer_fixture)
    encoder = ChatEncoder(tok)
    example = ex(chat_to_messages({"messages": CHAT}))
    enc = encoder.encode(example)
    prompt = encoder.encode_prompt(example.prompt_messages)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[len(prompt) - 1] == IGNORE_INDEX  # the generation prompt itself is masked
    assert all(label != IGNORE_INDEX for label in enc.labels[len(prompt):])
    answer = enc.input_ids[len(prompt):]
    assert tok.decode(answer, skip_special_tokens=True) == "Paris."
    assert answer[-1] == encoder.end_of_turn_id


def test_last_assistant_and_train_flag(chatml_tokenizer):
    tok = chatml_tokenizer
    last = ChatEncoder(tok, train_on="last_assistant").encode(ex(chat_to_messages({"messages": CHAT})))
    assert trained_text(tok, last) == ["Paris.<|im_end|>"]
    flagged = [dict(m) for m in CHAT]
    flagged[4]["train"] = False
    enc = ChatEncoder(tok).encode(ex(chat_to_messages({"messages": flagged})))
    assert trained_text(tok, enc) == ["Hello! 你好。<|im_end|>"]
    everything = ChatEncoder(tok, train_on="all").encode(ex(chat_to_messages({"messages": CHAT})))
    assert all(label != IGNORE_INDEX for label in everything.labels)


def test_system_prompt_added_only_when_missing(chatml_tokenizer):
    encoder = ChatEncoder(chatml_tokenizer, system_prompt="Be brief.")
    text = encoder.prompt_text([{"role": "user", "content": "x"}])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    own = encoder.prompt_text([{"role": "system", "content": "Mine."}, {"role": "user", "content": "x"}])
    assert "Be brief." not in own


def test_too_long_is_dropped_or_truncated_from_the_left(chatml_tokenizer):
    tok = chatml_tokenizer
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "Short answer."}
    example = ex(alpaca_to_messages(long_prompt), "alpaca")
    dropped = ChatEncoder(tok, max_length=64, truncation="drop").encode(example)
    assert isinstance(dropped, Skipped) and "max_length=64" in dropped.reason
    cut = ChatEncoder(tok, max_length=64, truncation="truncate_left").encode(example)
    assert isinstance(cut, Encoded) and cut.truncated and len(cut.input_ids) == 64
    assert trained_text(tok, cut) == ["Short answer.<|im_end|>"]  # the answer's end survives


def test_answer_longer_than_max_length_never_trains_zero_labels(chatml_tokenizer):
    tok = chatml_tokenizer
    example = ex(alpaca_to_messages({"instruction": "Say it.", "input": "", "output": "very long " * 100}), "alpaca")
    cut = ChatEncoder(tok, max_length=16, truncation="truncate_left").encode(example)
    assert isinstance(cut, Encoded) and cut.num_trained > 0
    assert cut.labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(ChatEncoder(tok, max_length=16).encode(example), Skipped)


def test_template_without_end_of_turn_is_refused(tmp_path):
    from conftest import build_tokenizer

    from llm_finetune.data.tokenize import TemplateError

    bare = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tok = build_tokenizer(tmp_path, bare)
    with pytest.raises(TemplateError, match="end-of-turn"):
        ChatEncoder(tok)


EOT = {"chatml_tokenizer": "<|im_end|>", "llama3_tokenizer": "<|eot_id|>"}


@pytest.mark.parametrize("tokenizer_fixture", ["chatml_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("flagged_turn", [2, 1, 4], ids=["assistant", "user", "last-assistant"])
def test_train_on_all_honours_train_false_exactly(request, tokenizer_fixture, flagged_turn):
    """train_on=all trains every token except the content and end-of-turn of a "train": false message."""
    tok = request.getfixturevalue(tokenizer_fixture)
    flagged = [dict(m) for m in CHAT]
    flagged[flagged_turn]["train"] = False
    enc = ChatEncoder(tok, train_on="all").encode(ex(chat_to_messages({"messages": flagged})))
    full = tok.apply_chat_template(CHAT, tokenize=False)
    hole = CHAT[flagged_turn]["content"] + EOT[tokenizer_fixture]
    start = full.index(hole)
    rest = full[start + len(hole):]
    if rest:  # everything else trained, the hole's tokens exactly masked
        assert trained_text(tok, enc) == [full[:start], rest]
        assert masked_text(tok, enc) == hole
        assert [i for i, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX] == \
            tok(hole, add_special_tokens=False)["input_ids"]
    else:  # the hole ends the text: nothing after the last trained token carries loss, so it is cut
        assert trained_text(tok, enc) == [full[:start]] and masked_text(tok, enc) == ""

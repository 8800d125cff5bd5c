"""Every format, rendered through ChatML and Llama-3 templates: golden masks, multi-turn, non-Latin text.

Each case gives the row and the assistant replies that must be trained, in order; everything else
(system, user, template markup) must be masked. Plain text trains every token and ends with EOS.
"""

from __future__ import annotations

import pytest
from test_masks import masked_text, trained_text

from llm_finetune.data.records import row_to_example
from llm_finetune.data.tokenize import IGNORE_INDEX, ChatEncoder, Encoded, Skipped

EOT = {"chatml_tokenizer": "<|im_end|>", "llama3_tokenizer": "<|eot_id|>"}

CASES = {
    "alpaca": (
        {"system": "你是一个翻译助手。", "history": [["你好", "你好！有什么可以帮你？"]],
         "instruction": "将下面的句子翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
        ["你好！有什么可以帮你？", "The weather is nice today."],
        ["你是一个翻译助手。", "你好", "将下面的句子翻译成英文。\n\n今天天气很好。"],
    ),
    "messages": (
        {"messages": [{"role": "system", "content": "Reply briefly."},
                      {"role": "user", "content": "Привет, как дела?"},
                      {"role": "assistant", "content": "مرحبا كيف حالك؟"},
                      {"role": "user", "content": "こんにちは、元気ですか。"},
                      {"role": "assistant", "content": "元気です。"}]},
        ["مرحبا كيف حالك؟", "元気です。"],
        ["Reply briefly.", "Привет, как дела?", "こんにちは、元気ですか。"],
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "You are terse."},
                           {"from": "human", "value": "机器学习是什么？"},
                           {"from": "gpt", "value": "人工智能的一个分支。"},
                           {"from": "user", "value": "Capital of France?"},
                           {"from": "model", "value": "Paris."}]},
        ["人工智能的一个分支。", "Paris."],
        ["You are terse.", "机器学习是什么？", "Capital of France?"],
    ),
    "prompt_completion": (
        {"prompt": "Привет! Translate: 今天天气很好。", "completion": "The weather is nice today."},
        ["The weather is nice today."],
        ["Привет! Translate: 今天天气很好。"],
    ),
    "prompt_completion_conversational": (
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "مرحبا"}],
         "completion": [{"role": "assistant", "content": "Hello, 你好!"}]},
        ["Hello, 你好!"],
        ["Be kind.", "مرحبا"],
    ),
}


def example(row, fmt="auto"):
    return row_to_example(row, fmt, "test.jsonl", 1)


@pytest.mark.parametrize("tokenizer_fixture", ["chatml_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("case", list(CASES))
def test_golden_masks(request, tokenizer_fixture, case):
    tok = request.getfixturevalue(tokenizer_fixture)
    row, answers, prompts = CASES[case]
    ex = example(row)
    assert ex.format == case.replace("_conversational", "")
    enc = ChatEncoder(tok).encode(ex)
    eot = EOT[tokenizer_fixture]
    # Every assistant turn trained (with its end-of-turn token) ...
    assert trained_text(tok, enc) == [a + eot for a in answers]
    # ... and every user and system turn masked.
    masked = masked_text(tok, enc)
    for text in prompts:
        assert text in masked
    for a in answers:
        assert a not in masked
    # The ids are the template's rendering, nothing added or lost.
    rendered = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in ex.messages],
                                       tokenize=False)
    assert rendered.startswith(tok.decode(enc.input_ids))


@pytest.fixture(scope="module")
def adds_bos_tokenizer(tmp_path_factory):
    """Like Llama 3's real tokenizer: `tokenizer(text)` puts <|begin_of_text|> first."""
    from conftest import LLAMA3, build_tokenizer

    tok = build_tokenizer(tmp_path_factory.mktemp("tok_adds_bos"), LLAMA3, eos="<|eot_id|>",
                          bos="<|begin_of_text|>", pad=None)
    tok.add_bos_token = True  # transformers rebuilds the post-processor: BOS $A
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    return tok


# (fixture, whether text rows start with BOS). llama3_tokenizer and chatml_tokenizer name a bos_token (or
# none) but add nothing, as SmolLM2's (bos_token <|im_start|>) does: no BOS may be invented for them.
TEXT_BOS = [("chatml_tokenizer", False), ("llama3_tokenizer", False), ("adds_bos_tokenizer", True)]


@pytest.mark.parametrize("tokenizer_fixture,starts_with_bos", TEXT_BOS)
def test_text_trains_every_token_and_ends_with_eos(request, tokenizer_fixture, starts_with_bos):
    tok = request.getfixturevalue(tokenizer_fixture)
    text = "机器学习是人工智能的一个分支。 Привет! The quick brown fox."
    ex = example({"text": text})
    assert ex.format == "text"
    enc = ChatEncoder(tok, system_prompt="never added to text").encode(ex)
    assert all(label != IGNORE_INDEX for label in enc.labels)
    assert enc.input_ids[-1] == tok.eos_token_id
    body = tok(text, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if starts_with_bos else []
    assert enc.input_ids == bos + body + [tok.eos_token_id]  # no chat markup, no system prompt


def test_text_gets_no_bos_from_a_named_bos_token_the_tokenizer_does_not_add(tmp_path):
    """SmolLM2's case: bos_token is <|im_start|> (also the chat turn marker), but the tokenizer adds no BOS."""
    from conftest import build_tokenizer

    tok = build_tokenizer(tmp_path, bos="<|im_start|>")
    assert tok.bos_token_id is not None and tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    enc = ChatEncoder(tok).encode(example({"text": "The quick brown fox."}))
    assert tok.bos_token_id not in enc.input_ids
    assert tok.decode(enc.input_ids) == "The quick brown fox.<|im_end|>"


def test_sharegpt_roles_and_train_flags(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"conversations": [{"from": "human", "value": "a?"}, {"from": "bot", "value": "A.", "train": False},
                             {"from": "HUMAN", "value": "b?"}, {"from": "chatgpt", "value": "B."}]}
    ex = example(row)
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert trained_text(tok, ChatEncoder(tok).encode(ex)) == ["B.<|im_end|>"]


@pytest.mark.parametrize("case", ["alpaca", "messages", "sharegpt"])
def test_train_on_last_assistant_and_all_in_every_format(chatml_tokenizer, case):
    tok = chatml_tokenizer
    row, answers, _ = CASES[case]
    last = ChatEncoder(tok, train_on="last_assistant").encode(example(row))
    assert trained_text(tok, last) == [answers[-1] + "<|im_end|>"]
    everything = ChatEncoder(tok, train_on="all").encode(example(row))
    assert all(label != IGNORE_INDEX for label in everything.labels)


@pytest.mark.parametrize("case", ["messages", "sharegpt", "prompt_completion_conversational"])
def test_train_false_on_every_reply_leaves_nothing_and_is_skipped(chatml_tokenizer, case):
    row = CASES[case][0]
    key = "conversations" if case == "sharegpt" else "messages"
    if case == "prompt_completion_conversational":
        row = {"prompt": row["prompt"], "completion": [dict(row["completion"][0], train=False)]}
    else:
        row = {key: [dict(m, train=False) if m.get("role", m.get("from")) in ("assistant", "gpt", "model") else m
                     for m in row[key]]}
    result = ChatEncoder(chatml_tokenizer).encode(example(row))
    assert isinstance(result, Skipped) and "no supervised tokens" in result.reason


LONG = "слово 词 word " * 120


@pytest.mark.parametrize("tokenizer_fixture", ["chatml_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("row", [
    {"instruction": LONG, "output": "短い答え。"},
    {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "短い答え。"}]},
    {"conversations": [{"from": "human", "value": LONG}, {"from": "gpt", "value": "短い答え。"}]},
    {"prompt": LONG, "completion": "短い答え。"},
], ids=["alpaca", "messages", "sharegpt", "prompt_completion"])
def test_truncation_keeps_the_answer_end_in_every_format(request, tokenizer_fixture, row):
    tok = request.getfixturevalue(tokenizer_fixture)
    ex = example(row)
    dropped = ChatEncoder(tok, max_length=48, truncation="drop").encode(ex)
    assert isinstance(dropped, Skipped) and "data.max_length=48" in dropped.reason and dropped.length > 48
    cut = ChatEncoder(tok, max_length=48, truncation="truncate_left").encode(ex)
    assert isinstance(cut, Encoded) and cut.truncated and len(cut.input_ids) == 48 and cut.full_length > 48
    assert trained_text(tok, cut) == ["短い答え。" + EOT[tokenizer_fixture]]
    assert cut.labels[-1] == tok.convert_tokens_to_ids(EOT[tokenizer_fixture])


def test_long_text_truncated_keeps_its_end(chatml_tokenizer):
    tok = chatml_tokenizer
    cut = ChatEncoder(tok, max_length=20, truncation="truncate_left").encode(example({"text": LONG + "THE END"}))
    assert len(cut.input_ids) == 20 and cut.num_trained == 20
    assert tok.decode(cut.input_ids).endswith("END<|im_end|>")


def test_format_override_and_unknown_rows():
    ex = example({"text": "x", "prompt": "p", "completion": "c"})
    assert ex.format == "prompt_completion"  # auto: prompt/completion comes before text
    assert example({"text": "x", "prompt": "p", "completion": "c"}, "text").format == "text"
    with pytest.raises(ValueError, match="missing required field 'instruction'"):
        example({"text": "x"}, "alpaca")


@pytest.mark.parametrize("row,reason", [
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "unknown role 'narrator'"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "no assistant reply to a user turn"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]},
     "no assistant reply to a user turn"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "tool", "value": "{}"}]}, "tool calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}]}, "tool calls"),
    ({"conversations": [{"value": "x"}]}, "missing required field 'from'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "'value' must be a string"),
    ({"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": "c"}, "both be strings or both lists"),
    ({"text": ""}, "field 'text' is empty"),
    ({"text": ["a"]}, "'text' must be a string"),
])
def test_format_specific_problems(row, reason):
    with pytest.raises(ValueError, match=reason):
        example(row)

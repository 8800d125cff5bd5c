"""The tokenisation cache: reused on a rerun, rebuilt when the data, tokenizer, template or max length change."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer, extraction_rows, write_jsonl

from llm_finetune.data.cache import cache_root, load_source
from llm_finetune.data.templates import apply_template
from llm_finetune.data.tokenize import ChatEncoder


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FINETUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "train.jsonl", extraction_rows(6) + [{"text": "机器学习 plain text"}])
    tok = build_tokenizer(tmp_path / "tok")
    return tmp_path, data, tok


def first_and_second(data, encoder):
    first = load_source(data, encoder)
    second = load_source(data, encoder)
    return first, second


def test_rerun_hits_and_gives_the_same_data(setup, monkeypatch):
    tmp_path, data, tok = setup
    encoder = ChatEncoder(tok, max_length=128)
    first = load_source(data, encoder)
    assert not first.cache_hit and first.key

    def fail(*a, **k):
        raise AssertionError("a cache hit must not tokenise again")

    monkeypatch.setattr(ChatEncoder, "encode_many", fail)
    second = load_source(data, encoder)
    assert second.cache_hit and second.key == first.key
    assert [(e.input_ids, e.labels, e.source, e.truncated) for e in second.encoded] == \
        [(e.input_ids, e.labels, e.source, e.truncated) for e in first.encoded]
    assert [(x.messages, x.format) for x in second.examples] == [(x.messages, x.format) for x in first.examples]
    assert second.formats == {"alpaca": 6, "text": 1} and second.rows == 7
    entries = list(cache_root().iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary folder left


def test_problems_are_cached_too(setup):
    tmp_path, data, tok = setup
    with open(data, "a") as f:
        f.write("{broken\n")
    first, second = first_and_second(data, ChatEncoder(tok))
    assert second.cache_hit and [str(p) for p in second.problems] == [str(p) for p in first.problems]
    assert second.problems[0].line == 8


def test_changed_data_contents_miss(setup):
    tmp_path, data, tok = setup
    encoder = ChatEncoder(tok, max_length=128)
    first = load_source(data, encoder)
    text = data.read_text().replace("Ana Silva", "Ana Silvb")  # same size, different bytes
    data.write_text(text)
    changed = load_source(data, encoder)
    assert not changed.cache_hit and changed.key != first.key
    assert "Silvb" in changed.examples[0].messages[-1]["content"]


def test_changed_tokenizer_miss(setup):
    tmp_path, data, tok = setup
    first = load_source(data, ChatEncoder(tok, max_length=128))
    other = build_tokenizer(tmp_path / "tok2")
    other.add_tokens(["Lisbon"])  # one more token: different ids for the same text
    changed = load_source(data, ChatEncoder(other, max_length=128))
    assert not changed.cache_hit and changed.key != first.key
    assert load_source(data, ChatEncoder(other, max_length=128)).cache_hit


def test_changed_template_miss(setup):
    tmp_path, data, tok = setup
    first = load_source(data, ChatEncoder(tok, max_length=128))
    apply_template(tok, "alpaca")
    changed = load_source(data, ChatEncoder(tok, max_length=128))
    assert not changed.cache_hit and changed.key != first.key
    assert changed.encoded[0].input_ids != first.encoded[0].input_ids


def test_changed_max_length_and_options_miss(setup):
    tmp_path, data, tok = setup
    first = load_source(data, ChatEncoder(tok, max_length=128))
    for encoder in (ChatEncoder(tok, max_length=64), ChatEncoder(tok, max_length=128, train_on="all"),
                    ChatEncoder(tok, max_length=128, system_prompt="Be brief.")):
        changed = load_source(data, encoder)
        assert not changed.cache_hit and changed.key != first.key
    assert load_source(data, ChatEncoder(tok, max_length=128)).cache_hit


def test_cache_off_and_prepare_data_records_hits(setup, tiny_model_dir):
    tmp_path, data, tok = setup
    assert not load_source(data, ChatEncoder(tok), use_cache=False).cache_hit
    from llm_finetune.config import load_config
    from llm_finetune.data.prepare import prepare_data
    from llm_finetune.models import load_tokenizer

    cfg = load_config(None, [f"data.train_file={data}", "data.eval_file=null", "data.max_length=128"])
    first = prepare_data(cfg, load_tokenizer(str(tiny_model_dir)))
    second = prepare_data(cfg, load_tokenizer(str(tiny_model_dir)))
    assert [c["hit"] for c in first.info["cache"]] == [False]
    assert [c["hit"] for c in second.info["cache"]] == [True]
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]


@pytest.mark.parametrize("change", ["pad", "eos", "adds_bos"])
def test_tokenizer_differing_only_in_special_token_ids_misses(setup, change):
    """Same vocabulary, added tokens and template: the old fingerprint could not tell these apart."""
    from llm_finetune.data.cache import encoder_key

    tmp_path, data, tok = setup
    first = load_source(data, ChatEncoder(tok, max_length=128))
    kwargs = {"pad": "<|endoftext|>"} if change == "pad" else {"eos": "<|endoftext|>"} if change == "eos" else \
        {"bos": "<|begin_of_text|>"}
    other = build_tokenizer(tmp_path / "tok2", **kwargs)
    if change == "adds_bos":
        load_source(data, ChatEncoder(other, max_length=128))  # names a BOS but adds none: same ids
        other.add_bos_token = True  # now the tokenizer really puts a BOS before a text
    assert other.get_vocab() == tok.get_vocab() and other.chat_template == tok.chat_template
    encoder = ChatEncoder(other, max_length=128)
    assert encoder_key(encoder) != encoder_key(ChatEncoder(tok, max_length=128))
    changed = load_source(data, encoder)
    assert not changed.cache_hit and changed.key != first.key
    # What was loaded is what this tokenizer produces (the text row ends with its EOS, starts with its BOS).
    fresh = [encoder.encode(ex) for ex in changed.examples]
    assert [e.input_ids for e in changed.encoded] == [e.input_ids for e in fresh]
    if change != "pad":
        assert changed.encoded[-1].input_ids != first.encoded[-1].input_ids


def test_file_problems_and_repairs_survive_the_cache(tmp_path, monkeypatch, chatml_tokenizer):
    monkeypatch.setenv("LLM_FINETUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cut.json"
    row = {"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    path.write_text("[\n" + json.dumps(row) + ",\n" + json.dumps(row)[:30], encoding="utf-8")
    first = load_source(path, ChatEncoder(chatml_tokenizer))
    second = load_source(path, ChatEncoder(chatml_tokenizer))
    assert second.cache_hit and not second.problems and len(second.examples) == 1
    assert [str(p) for p in second.file_problems] == [str(p) for p in first.file_problems]
    assert second.file_problems[0].scope == "file" and "cut off part-way" in second.file_problems[0].reason
    assert second.examples[0].messages[0] == {"role": "assistant", "content": "Hi!", "train": False}

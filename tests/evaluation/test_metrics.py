"""Each metric on small hand-checked cases: a right and a wrong answer, and the statistics around them."""

from __future__ import annotations

import pytest

from llm_finetune.data.records import Example
from llm_finetune.evaluation.leakage import find_leaks
from llm_finetune.evaluation.metrics import (
    FormatChecker,
    agreement,
    chrf,
    contains_match,
    difference,
    distribution,
    exact_match,
    json_match,
    mean_score,
    normalize_text,
    normalized_match,
    paired_bootstrap,
    rate,
    rouge_l,
    token_weighted_difference,
    wilson_interval,
)


def test_exact_match():
    assert exact_match("Paris\n", "Paris")
    assert not exact_match("paris", "Paris")


def test_normalized_match_ignores_case_spaces_and_punctuation_only():
    assert normalize_text("  Hello,   WORLD! ") == "hello world"
    assert normalized_match("the answer is: PARIS.", "The answer is Paris")
    assert normalized_match("东京。", "东京")  # full-width punctuation is punctuation too
    assert not normalized_match("Paris, France", "Paris")
    assert not normalized_match("12", "1 2")  # spacing that splits a token is a different answer


def test_contains_match_needs_whole_words():
    assert contains_match("The capital of France is Paris.", "Paris")
    assert not contains_match("Parisian food is good", "Paris")
    assert not contains_match("anything", "")


def test_json_match():
    assert json_match('{"name": "X", "age": 1}', '{"name": "A", "age": 2}')
    assert not json_match('{"age": 1, "name": "X"}', '{"name": "A", "age": 2}')  # key order is the format
    assert not json_match("{'name': 'X'}", '{"name": "A"}')


def test_rouge_l_hand_computed():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words: P = 3/3, R = 3/6, F1 = 2/3.
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dogs bark loudly", "the cat sat on the mat") == 0.0
    # Non-Latin text is scored too (rouge-score's own tokenizer would drop it): CJK per character.
    assert rouge_l("今天天气很好", "今天天气很好") == pytest.approx(1.0)
    assert rouge_l("今天天气很好", "明日雨") == 0.0


def test_chrf_right_and_wrong():
    assert chrf("Lisbon", "Lisbon") == pytest.approx(1.0)
    assert chrf("xyzzy", "Lisbon") == pytest.approx(0.0)
    near = chrf("Lisboa", "Lisbon")
    assert 0.3 < near < 1.0  # shares most character n-grams


def test_format_json_schema_and_regex():
    schema = {"type": "object", "required": ["name", "age"], "properties": {"age": {"type": "integer"}}}
    check = FormatChecker("json_schema", schema=schema)
    assert check(' {"name": "A", "age": 3} ')
    assert not check('{"name": "A", "age": "three"}')  # wrong type
    assert not check('{"name": "A"}')  # missing key
    assert not check("name: A")  # not JSON
    assert FormatChecker("json")("[1, 2]") and not FormatChecker("json")("[1, 2")
    choice = FormatChecker("regex", regex=r"[A-D]")
    assert choice(" B\n") and not choice("B because") and not choice("E")
    with pytest.raises(Exception):
        FormatChecker("json_schema", schema={"type": "no-such-type"})


def test_wilson_and_rate():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    r = rate([True, True, False, False])
    assert (r["value"], r["k"], r["n"]) == (0.5, 2, 4)
    assert r["ci95"] == pytest.approx(list(wilson_interval(2, 4)))


def test_bootstrap_intervals():
    assert paired_bootstrap([1, 0] * 10, [1, 0] * 10) == (0.0, 0.0)
    d = difference([0.0] * 30, [1.0] * 24 + [0.0] * 6)  # a gain of 0.8 on 30 paired examples
    assert d["value"] == pytest.approx(0.8) and d["significant"] and 0.6 < d["ci95"][0] < 0.8 < d["ci95"][1]
    noise = difference([1, 0] * 10, [0, 1] * 10)  # as many wins as losses
    assert noise["value"] == 0 and not noise["significant"]
    m = mean_score([0.2, 0.4, 0.6])
    assert m["value"] == pytest.approx(0.4) and m["ci95"][0] >= 0.2 and m["ci95"][1] <= 0.6


def test_token_weighted_loss_difference():
    # Example 2 has 9 of the 10 tokens, so its change dominates: (-9*1 + 1*1) / 10 = -0.8.
    d = token_weighted_difference([2.0, 18.0], [3.0, 9.0], [1, 9])
    assert d["value"] == pytest.approx(-0.8)


def test_distribution_and_agreement():
    dist = distribution([1, 2, 3, 4, 10])
    assert (dist["mean"], dist["median"], dist["min"], dist["max"], dist["p90"]) == (4, 3, 1, 10, 10)
    assert agreement(["Paris", "paris.", "Paris"]) == 1.0  # normalised answers agree
    assert agreement(["Paris", "Rome", "Oslo", "Paris"]) == 0.5


def _ex(q: str, a: str, src: str) -> Example:
    return Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], src, "alpaca")


def test_leak_check_counts_and_names():
    train = [_ex("Capital of France?", "Paris", "train.jsonl:1"), _ex("2+2?", "4", "train.jsonl:2"),
             _ex("Colour of sky?", "blue", "train.jsonl:3")]
    held_out = [_ex("Capital of France?", "Paris", "eval.jsonl:1"),       # verbatim copy
                _ex("  2+2?", "4", "eval.jsonl:2"),                        # only spacing differs
                _ex("colour of SKY?", "Blue, usually", "eval.jsonl:3"),    # same prompt, other answer
                _ex("Largest planet?", "Jupiter", "eval.jsonl:4")]         # clean
    leaks = find_leaks(held_out, train)
    assert leaks["exact"]["count"] == 1 and leaks["normalized"]["count"] == 2 and leaks["prompt"]["count"] == 3
    assert leaks["listed"] == [{"eval": "eval.jsonl:1", "train": "train.jsonl:1", "match": "exact"},
                               {"eval": "eval.jsonl:2", "train": "train.jsonl:2", "match": "normalized"},
                               {"eval": "eval.jsonl:3", "train": "train.jsonl:3", "match": "prompt"}]

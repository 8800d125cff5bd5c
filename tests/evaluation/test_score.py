"""Metrics on small hand-checked cases."""

from __future__ import annotations

import pytest

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

"""generate, chat and predict end to end through the CLI on the tiny model with a briefly trained adapter."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import write_jsonl
from generation_helpers import greedy_continuation
from result_helpers import train_tiny_adapter

from llm_finetune.cli import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return train_tiny_adapter(tmp_path_factory.mktemp("gen"), tiny_model_dir)


@pytest.fixture(scope="module")
def loaded(adapter):
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.generate import load_for_inference

    model, tokenizer = load_for_inference(str(json.loads((adapter / "run_manifest.json").read_text())["model"]
                                              ["load_path"]), str(adapter))
    return model, tokenizer, ChatEncoder(tokenizer)


PROMPT = "Extract name, age and city as JSON.\n\nDana Ito, 33, lives in Rome."


def test_generate_greedy_uses_adapter_and_its_base(adapter, loaded, capsys):
    from llm_finetune.generate import generate_batch

    # No --model: the base comes from the adapter's run manifest.
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "16", PROMPT]) == 0
    streamed = capsys.readouterr().out
    model, tokenizer, encoder = loaded
    ids = encoder.encode_prompt([{"role": "user", "content": PROMPT}])
    expected = generate_batch(model, tokenizer, [ids], encoder.generation_eos_ids(), max_new_tokens=16)[0]
    assert streamed.rstrip("\n") == expected.text
    # That answer is the adapter's own greedy continuation, and not the base model's.
    greedy = greedy_continuation(model, ids, encoder.generation_eos_ids(), 16)
    assert expected.new_tokens == len(greedy) > 0
    assert expected.text == tokenizer.decode(greedy, skip_special_tokens=True)
    with model.disable_adapter():
        base_answer = generate_batch(model, tokenizer, [ids], encoder.generation_eos_ids(), max_new_tokens=16)[0]
    assert base_answer.text != expected.text


def test_generate_sampling_repeats_with_seed(adapter, capsys):
    args = ["generate", "--adapter", str(adapter), "--max-new-tokens", "12", "--temperature", "1.5",
            "--top-p", "0.95", PROMPT]
    outs = []
    for seed in ("1", "1", "2", "3"):
        assert main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "12", PROMPT]) == 0
    greedy = capsys.readouterr().out
    assert outs[0] == outs[1]
    assert len(set(outs[1:] + [greedy])) > 1  # sampling really samples


def test_generate_rejects_bad_settings(adapter, capsys):
    assert main(["generate", "--adapter", str(adapter), "--temperature", "-1", "hi"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--top-p", "0", "hi"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_chat_piped_script_keeps_history_and_resets(adapter, loaded, monkeypatch, capsys):
    from llm_finetune.generate import Sampling, chat_loop

    model, tokenizer, encoder = loaded
    script = "Dana Ito, 33, lives in Rome.\nAnd her city?\n/reset\nBo Chen, 31, lives in Oslo.\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--adapter", str(adapter), "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "[history cleared]" in out and "you>" not in out  # piped: no prompts, answers only

    # The same turns through the loop: the second answer is generated with the first exchange as history.
    sink = io.StringIO()
    history = chat_loop(model, tokenizer, encoder, ["Dana Ito, 33, lives in Rome.", "And her city?"], sink,
                        Sampling(max_new_tokens=10))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    alone = chat_loop(model, tokenizer, encoder, ["And her city?"], io.StringIO(), Sampling(max_new_tokens=10))
    assert len(alone) == 2
    after_reset = chat_loop(model, tokenizer, encoder, ["Dana Ito, 33, lives in Rome.", "/reset", "And her city?"],
                            io.StringIO(), Sampling(max_new_tokens=10))
    assert after_reset == alone
    # What the CLI printed is exactly these answers, in order.
    first_two = [history[1]["content"], history[3]["content"]]
    third = chat_loop(model, tokenizer, encoder, ["Bo Chen, 31, lives in Oslo."], io.StringIO(),
                      Sampling(max_new_tokens=10))[1]["content"]
    assert out == f"{first_two[0]}\n{first_two[1]}\n[history cleared]\n{third}\n"


def _prompt_rows():
    """Every readable prompt shape, with lengths that differ a lot so batches need real padding."""
    return [
        {"instruction": "Extract name, age and city as JSON.", "input": "Eli Roth, 41, lives in Lima."},
        {"instruction": "Extract name, age and city as JSON.", "input": "Fay Wong, 29, lives in Kyiv.",
         "output": '{"name": "Fay Wong", "age": 29, "city": "Kyiv"}'},
        {"messages": [{"role": "system", "content": "You answer with JSON only."},
                      {"role": "user", "content": "Gus Lund, 52, lives in Quito. Extract name, age, city."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Hana Kim, 37, lives in Paris."},
                      {"role": "assistant", "content": "{}"}]},
        {"prompt": "Ana"},
        {"prompt": "The quick brown fox jumps over the lazy dog. " * 3},
        {"instruction": "Name?", "input": ""},
    ]


def test_predict_batched_equals_one_by_one(adapter, loaded, tmp_path, capsys):
    from llm_finetune.generate import stream_one

    src = write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows())
    batched, single = tmp_path / "batched.jsonl", tmp_path / "single.jsonl"
    assert main(["predict", str(src), "--adapter", str(adapter), "--out", str(batched), "--batch-size", "4",
                 "--max-new-tokens", "12"]) == 0
    assert main(["predict", str(src), "--adapter", str(adapter), "--out", str(single), "--batch-size", "1",
                 "--max-new-tokens", "12"]) == 0
    assert "7 predictions written" in capsys.readouterr().out
    rows_b = [json.loads(x) for x in batched.read_text().splitlines()]
    rows_s = [json.loads(x) for x in single.read_text().splitlines()]
    assert [r["source"] for r in rows_b] == [f"{src}:{i}" for i in range(1, 8)]  # input order kept
    assert [r["prediction"] for r in rows_b] == [r["prediction"] for r in rows_s]
    assert any(r["new_tokens"] > 0 for r in rows_b)
    assert rows_b[1]["reference"] == '{"name": "Fay Wong", "age": 29, "city": "Kyiv"}'
    assert rows_b[3]["reference"] == "{}" and rows_b[3]["messages"][-1]["content"] == "Hana Kim, 37, lives in Paris."
    assert "reference" not in rows_b[0]

    # And equal to unbatched, unpadded generation of each prompt on its own.
    model, tokenizer, encoder = loaded
    for row in rows_b:
        ids = encoder.encode_prompt(row["messages"])
        alone = stream_one(model, tokenizer, ids, encoder.generation_eos_ids(), max_new_tokens=12, out=io.StringIO())
        assert alone.text == row["prediction"]


def test_predict_bad_row_names_line_and_writes_nothing(adapter, tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "x"}]},
                                             {"text": "?"}])
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(src), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2" in err and f"{src}:3" in err and "no user turn" in err
    assert not out.exists()

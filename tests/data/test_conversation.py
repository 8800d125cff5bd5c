"""Real chat exports: what ShareGPT / chat dumps contain, kept where a person would keep it, else a clear reason.

The cases mimic what `data check` found in a real ShareGPT export (benchmarks/results/sharegpt_check.md):
conversations starting with the assistant (40% of rows), consecutive turns by one speaker, empty turns,
an unanswered last user turn, other role names (bing, bard), and a .json array cut part-way.
"""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer, write_jsonl
from test_masks import masked_text, trained_text

from llm_finetune.cli import main
from llm_finetune.config import ConfigError, load_config
from llm_finetune.data.conversation import NOTE_CONTEXT, NOTE_EMPTY, NOTE_MERGED, NOTE_TRAILING
from llm_finetune.data.doctor import check
from llm_finetune.data.records import DataError, read_examples, row_to_example
from llm_finetune.data.tokenize import ChatEncoder, Encoded, Skipped

EOT = {"chatml_tokenizer": "<|im_end|>", "llama3_tokenizer": "<|eot_id|>"}
GREETING = {"conversations": [{"from": "gpt", "value": "Hello! How can I help?"},
                              {"from": "human", "value": "Capital of France?"},
                              {"from": "gpt", "value": "Paris."}]}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FINETUNE_CACHE", str(tmp_path / "cache"))


def example(row, roles=None):
    return row_to_example(row, "auto", "t.jsonl", 1, roles=roles)


@pytest.mark.parametrize("tokenizer_fixture", ["chatml_tokenizer", "llama3_tokenizer"])
def test_leading_assistant_turn_is_rendered_but_never_trained(request, tokenizer_fixture):
    tok = request.getfixturevalue(tokenizer_fixture)
    ex = example(GREETING)
    assert ex.messages[0] == {"role": "assistant", "content": "Hello! How can I help?", "train": False}
    assert ex.notes == [NOTE_CONTEXT]
    eot = EOT[tokenizer_fixture]
    for train_on in ("assistant", "last_assistant"):
        enc = ChatEncoder(tok, train_on=train_on).encode(ex)
        assert trained_text(tok, enc) == ["Paris." + eot]
        assert "Hello! How can I help?" in masked_text(tok, enc)  # rendered, as context
    everything = ChatEncoder(tok, train_on="all").encode(ex)
    assert masked_text(tok, everything) == "Hello! How can I help?" + eot  # "never": not under train_on=all either


def test_leading_assistant_row_marked_train_true_is_trained(chatml_tokenizer):
    row = {"messages": [{"role": "assistant", "content": "Hi!", "train": True}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    enc = ChatEncoder(chatml_tokenizer).encode(example(row))
    assert trained_text(chatml_tokenizer, enc) == ["Hi!<|im_end|>", "a<|im_end|>"]


REFUSING = (  # like the Llama-2 / Mistral templates on the Hub: roles must alternate, starting with the user
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_that_cannot_start_with_the_assistant_rejects_the_row_with_that_reason(tmp_path):
    tok = build_tokenizer(tmp_path / "tok", REFUSING)
    encoder = ChatEncoder(tok)
    refused = encoder.encode(example(GREETING))
    assert isinstance(refused, Skipped) and refused.refused
    assert "cannot render a conversation that starts with an assistant turn" in refused.reason
    assert "Conversation roles must alternate" in refused.reason
    plain = example({"conversations": GREETING["conversations"][1:]})
    assert isinstance(encoder.encode(plain), Encoded)
    # data check lists it as an invalid row, with the reason, and does not count it as valid.
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": GREETING["conversations"][1:]}, GREETING])
    report = check(path, encoder)
    assert (report.examples, report.problems, report.formats) == (1, 1, {"sharegpt": 1})
    assert report.first_problems == [f"{path}:2: {refused.reason}"] and not report.ok


@pytest.mark.parametrize("key,field", [("conversations", "from"), ("messages", "role")])
def test_data_roles_maps_other_role_names(key, field):
    text = "value" if key == "conversations" else "content"
    row = {key: [{field: "user" if key == "messages" else "human", text: "Hi"},
                 {field: "Bing", text: "Hello."}, {field: "user" if key == "messages" else "human", text: "2+2?"},
                 {field: "bard", text: "4"}]}
    with pytest.raises(ValueError, match=r"\[1\]: unknown role 'Bing'.*data.roles: \{\"Bing\": \"assistant\"\}"):
        example(row)
    ex = example(row, roles={"bing": "assistant", "BARD": "assistant"})
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]


def test_data_roles_config_is_validated_and_reaches_the_readers(tmp_path, chatml_tokenizer):
    with pytest.raises(ConfigError, match=r"data.roles.bing: got 'bot', expected 'system', 'user' or 'assistant'"):
        load_config(None, ['data.roles={"bing": "bot"}'])
    with pytest.raises(ConfigError, match="data.roles: got \\['bing'\\], expected an object"):
        load_config(None, ['data.roles=["bing"]'])
    cfg = load_config(None, ['data.roles={"bing": "assistant"}', "data.eval_file=null", "data.max_length=64",
                             f"data.train_file={tmp_path / 'd.jsonl'}"])
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "bing", "value": f"a{i}"}]}
            for i in range(4)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    from llm_finetune.data.prepare import prepare_data

    prepared = prepare_data(cfg, chatml_tokenizer)
    assert len(prepared.train) == 4 and prepared.info["invalid_rows"] == 0
    # The mapping is part of the cache key: without it the same bytes read differently.
    cfg.data.roles = {}
    cfg.data.on_error = "skip"
    with pytest.raises(DataError, match="no valid examples"):
        prepare_data(cfg, chatml_tokenizer)


def test_what_real_exports_contain_is_repaired_as_a_person_would():
    row = {"id": "QWJhYvA_7", "model": "gpt-4", "conversations": [
        {"from": "System", "value": "Be brief."},
        {"from": "HUMAN", "value": "First part."},
        {"from": "human", "value": "Second part."},
        {"from": "human", "value": "   "},  # empty turn
        {"from": "GPT", "markdown": "Answer **one**."},  # text under another key
        {"role": "gpt", "value": "And more."},  # speaker under "role"
        {"from": "human", "value": "thanks"},
        {"from": "chatgpt", "value": "", "train": False},  # empty reply to the last message
        {"from": "human", "value": "are you there?"},  # never answered
    ]}
    ex = example(row)
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First part.\n\nSecond part."},
        {"role": "assistant", "content": "Answer **one**.\n\nAnd more."},
    ]
    assert ex.notes == [NOTE_EMPTY, NOTE_MERGED, NOTE_TRAILING]


def test_merged_turn_is_trained_only_if_every_part_is(chatml_tokenizer):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "draft", "train": False},
                        {"role": "assistant", "content": "final"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    ex = example(row)
    assert ex.messages[1] == {"role": "assistant", "content": "draft\n\nfinal", "train": False}
    assert trained_text(chatml_tokenizer, ChatEncoder(chatml_tokenizer).encode(ex)) == ["a2<|im_end|>"]


def test_openai_text_parts_and_developer_role():
    row = {"messages": [{"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hello."}]}
    assert example(row).messages == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi there"},
                                     {"role": "assistant", "content": "Hello."}]
    row["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ValueError, match=r"messages\[1\]: content\[0\] is a 'image_url' part; only text parts"):
        example(row)


@pytest.mark.parametrize("row,reason", [
    ({"conversations": []}, "is an empty list: the conversation has no turns"),
    ({"conversations": "hi"}, "must be a non-empty list of {from, value} objects"),
    ({"conversations": [{"from": "gpt", "value": "Hi!"}]}, "no assistant reply to a user turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "no assistant reply to a user turn"),
    ({"conversations": [{"from": "system", "value": "s"}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "system", "value": "s"}]}, r"conversations\[2\]: a system message may only come first"),
    ({"conversations": [{"from": "human"}]}, "missing required field 'value'"),
])
def test_rows_a_person_would_not_train_are_rejected_with_the_reason(row, reason):
    with pytest.raises(ValueError, match=reason):
        example(row)


def cut_json(path, rows, keep_chars=40):
    """A .json array whose last element is cut part-way, as a download or export that stopped."""
    text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text(text[: len(text) - len(json.dumps(rows[-1])) + keep_chars], encoding="utf-8")
    return path


def test_cut_json_array_is_one_file_problem_at_the_top_of_data_check(tmp_path, tiny_model_dir, capsys):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(5)]
    path = cut_json(tmp_path / "export.json", rows)
    broken = write_jsonl(tmp_path / "lines.jsonl", [rows[0], '{"conversations": [', rows[1]])
    model = f"model.name_or_path={tiny_model_dir}"
    assert main(["data", "check", str(path), "--set", model, "--no-plot"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(f"  FILE PROBLEM     {path}:6: the JSON array is cut off part-way")
    assert "the 4 row(s) before it were read" in out[2]
    assert "  rows read        4" in out and "  invalid rows     0" in out
    assert not any(line.startswith("invalid rows (") for line in out)  # not listed among the row problems
    assert main(["data", "check", str(path), "--set", model, "--no-plot", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["invalid_rows"] == 0 and report["examples"] == 4 and len(report["file_problems"]) == 1
    # A single broken JSON Lines line stays a row problem.
    assert main(["data", "check", str(broken), "--set", model, "--no-plot", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["file_problems"] == [] and report["invalid_rows"] == 1 and report["examples"] == 2


def test_cut_json_array_trains_on_the_rows_before_the_cut_with_on_error_skip(tmp_path, tiny_model_dir):
    from llm_finetune.train import run

    rows = [{"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": f"q{i}"},
                               {"from": "gpt", "value": f"a{i}"}]} for i in range(9)]
    path = cut_json(tmp_path / "export.json", rows)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_file={path}", "data.eval_file=null",
                             "data.on_error=skip", f"output.dir={tmp_path / 'ck'}", f"output.logs_dir={tmp_path / 'logs'}",
                             "train.max_steps=2", "train.batch_size=4", "eval.compare_base=false"])
    result = run(cfg)
    assert result.manifest["data"]["split"]["train_examples"] == 8
    assert result.manifest["data"]["invalid_rows"] == 0
    assert result.manifest["data"]["file_problems"] == [f"{path}:10: the JSON array is cut off part-way (this row is "
                                                        "incomplete and there is no closing ']'); the file is "
                                                        "truncated, re-export it"]
    log = (tmp_path / "logs" / "training.log").read_text().splitlines()
    data_lines = [line for line in log if "data:" in line]
    assert "FILE PROBLEM" in data_lines[0] and "cut off part-way" in data_lines[0]
    rejects = [json.loads(line) for line in (tmp_path / "logs" / "rejected_rows.jsonl").read_text().splitlines()]
    assert rejects == [{"path": str(path), "line": 10, "reason": result.manifest["data"]["file_problems"][0].split(
        ":10: ")[1], "scope": "file", "stage": "read"}]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_read_examples_counts_the_repairs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GREETING, {"conversations": GREETING["conversations"][1:]}])
    result = read_examples(path)
    assert len(result.examples) == 2 and result.repairs == {NOTE_CONTEXT: 1}

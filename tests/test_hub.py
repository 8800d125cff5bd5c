"""push: file selection, model card and token handling.

There is no network here, so the Hub client is replaced at its boundary: the `create_repo` and
`create_commit` methods of `huggingface_hub.HfApi` are monkeypatched to record what they receive.
Everything up to that call (what is selected, the card, the token lookup) is the real code.
"""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from result_helpers import train_tiny_adapter

from llm_finetune.cli import main

SECRET = "hf_TESTSECRETtokenVALUE0123456789"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("push")
    ad = train_tiny_adapter(root, tiny_model_dir)
    # Things that must never be uploaded: a stale card, hidden files, trainer state.
    (ad / "README.md").write_text("old card")
    (ad / ".DS_Store").write_text("x")
    (ad / "checkpoint-5").mkdir()
    (ad / "checkpoint-5" / "optimizer.pt").write_text("x")
    return ad


@pytest.fixture
def hub(monkeypatch):
    """Record HfApi calls instead of reaching the network."""
    calls = {"tokens": [], "create_repo": [], "create_commit": []}
    real_init = huggingface_hub.HfApi.__init__

    def init(self, *a, **kw):
        calls["tokens"].append(kw.get("token"))
        real_init(self, *a, **kw)

    def create_repo(self, repo_id, **kw):
        calls["create_repo"].append((repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        ops = {}
        for op in operations:
            data = op.path_or_fileobj
            ops[op.path_in_repo] = data if isinstance(data, bytes) else open(data, "rb").read()
        calls["create_commit"].append((repo_id, ops, kw))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                                          commit_message="m", commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", init)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return calls


EXPECTED_ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                          "tokenizer_config.json", "chat_template.jinja", "run_manifest.json", "run_config.json",
                          "eval_report.json", "eval_report.md", "README.md"}


def test_push_adapter_uploads_exactly_the_selection_with_card(adapter, hub, capsys):
    assert main(["push", str(adapter), "--repo", "me/tiny-adapter", "--private"]) == 0
    out, err = capsys.readouterr()
    assert hub["tokens"] == [SECRET]
    assert SECRET not in out + err
    assert hub["create_repo"] == [("me/tiny-adapter", {"repo_type": "model", "private": True, "exist_ok": True})]
    (repo, ops, _), = hub["create_commit"]
    assert set(ops) <= EXPECTED_ADAPTER_FILES and {"adapter_model.safetensors", "adapter_config.json",
                                                    "run_manifest.json", "eval_report.json", "README.md"} <= set(ops)
    assert ops["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()

    card = ops["README.md"].decode()
    manifest = json.loads((adapter / "run_manifest.json").read_text())
    report = json.loads((adapter / "eval_report.json").read_text())
    assert SECRET not in card and "old card" not in card
    assert "library_name: peft" in card
    assert manifest["model"]["load_path"] in card  # the base model
    assert '- r: `16`' in card and "- name: `\"lora\"`" in card  # method settings (r: the default)
    assert "`null`" not in card and "adalora" not in card and "num_virtual_tokens" not in card  # only lora's
    assert manifest["data"]["train_file"]["sha256"] in card and "24 lines" in card  # data fingerprint and size
    assert f"- steps: {manifest['training']['steps']}" in card and "- learning_rate: 0.01" in card
    assert f"| eval_loss | {report['base']['eval_loss']:.4g} | {report['tuned']['eval_loss']:.4g} |" in card
    assert "AutoPeftModelForCausalLM.from_pretrained(\"me/tiny-adapter\")" in card


def test_dry_run_lists_everything_and_uploads_nothing(adapter, hub, capsys):
    assert main(["push", str(adapter), "--repo", "me/tiny-adapter", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub["create_repo"] == [] and hub["create_commit"] == [] and hub["tokens"] == []
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and "bytes" in line}
    assert {"adapter_model.safetensors", "adapter_config.json", "run_manifest.json", "README.md"} <= listed
    assert listed <= EXPECTED_ADAPTER_FILES
    assert ".DS_Store" not in out and "checkpoint-5" not in out and "optimizer.pt" not in out
    assert "## Evaluation" in out  # the card is shown too


def test_push_gguf_and_merged(adapter, hub, tmp_path, capsys):
    from llm_finetune.export.gguf import export_gguf
    from llm_finetune.export.merge import merge

    merged = tmp_path / "merged"
    merge(adapter, merged)
    assert main(["push", str(merged), "--repo", "me/tiny-merged"]) == 0
    (_, ops, _), = hub["create_commit"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(ops)
    assert "library_name: transformers" in ops["README.md"].decode()

    gguf_path = tmp_path / "g" / "tiny.gguf"
    export_gguf(gguf_path, adapter=str(adapter), verify=False)
    assert main(["push", str(gguf_path), "--repo", "me/tiny-gguf"]) == 0
    (_, ops, _) = hub["create_commit"][1]
    assert set(ops) == {"tiny.gguf", "Modelfile", "README.md"}
    assert 'gguf_file="tiny.gguf"' in ops["README.md"].decode()
    assert SECRET not in capsys.readouterr().out


def test_push_without_token_or_offline_fails_clearly(adapter, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(adapter), "--repo", "me/x"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(adapter), "--repo", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert hub["create_commit"] == []


def test_a_failed_upload_never_shows_the_token(adapter, hub, monkeypatch, capsys):
    """A client error that echoes the request's Authorization header: the message keeps the cause, not the token."""
    def rejected(self, repo_id, **kw):
        raise RuntimeError(f"401 Unauthorized for {repo_id} (headers: Authorization: Bearer {SECRET})")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", rejected)
    assert main(["push", str(adapter), "--repo", "me/x"]) == 2
    captured = capsys.readouterr()
    assert "upload to me/x failed: RuntimeError: 401 Unauthorized" in captured.err and "hf_***" in captured.err
    assert SECRET not in captured.err + captured.out


def test_push_bad_inputs(tmp_path, capsys):
    assert main(["push", str(tmp_path), "--repo", "me/x", "--dry-run"]) == 2
    assert "not something to push" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo", "no-owner", "--dry-run"]) == 2
    assert "owner/name" in capsys.readouterr().err


def test_a_dpo_adapter_merges_exports_and_pushes_like_an_sft_one(hub, tmp_path, tiny_model_dir, capsys):
    """A preference run's adapter folder is the SFT one: `merge`, `export` and `push` take it unchanged, and its
    card carries the preference table (not "no evaluation"); the regression set is scored base vs tuned."""
    from conftest import write_jsonl
    from test_preference import _cfg, _pairs

    from llm_finetune.preference_train import run

    write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    write_jsonl(tmp_path / "general.jsonl", [{"instruction": f"Repeat {w}", "output": w} for w in ("one", "two", "ok")])
    result = run(_cfg(tmp_path, tiny_model_dir, "dpo", "train.max_steps=8", "eval.max_new_tokens=4",
                      f"eval.regression_file={tmp_path / 'general.jsonl'}"))
    regression = result.report["regression"]
    assert regression["base"]["n"] == regression["tuned"]["n"] == 3 and "difference" in regression
    assert "regression set (3 general prompts)" in (tmp_path / "dpo" / "logs" / "training.log").read_text()
    adapter = result.adapter_dir
    card = (adapter / "README.md").read_text()
    assert "preference accuracy" in card and "No held-out evaluation" not in card and "- objective: dpo" in card

    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "g" / "dpo.gguf")]) == 0
    assert main(["push", str(adapter), "--repo", "me/tiny-dpo"]) == 0
    (_, ops, _), = hub["create_commit"]
    assert {"adapter_model.safetensors", "adapter_config.json", "preference_report.json", "README.md"} <= set(ops)
    assert "preference accuracy" in ops["README.md"].decode()
    assert ops["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()

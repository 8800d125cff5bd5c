"""The seed's model families (Llama, Mistral, Falcon, GPT-2) plus Qwen2 and Gemma 2, as tiny random
models: LoRA trains, saves, reloads and merges on each; every method builds, trains a step and
generates on each; targets resolve per architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import extraction_rows, write_jsonl
from conftest_arch import ARCHS, build_arch

from llm_finetune import methods
from llm_finetune.config import MethodConfig, load_config
from llm_finetune.methods import MethodError
from llm_finetune.models import load_model


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_arch(root / arch, arch, chatml_tokenizer) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_saves_reloads_and_merges(arch, arch_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_finetune.train import run

    write_jsonl(tmp_path / "train.jsonl", extraction_rows(16))
    cfg = load_config(None, [f"model.name_or_path={arch_dirs[arch]}", f"data.train_file={tmp_path / 'train.jsonl'}",
                             "data.eval_file=null", "data.max_length=128", "train.max_steps=6",
                             "train.learning_rate=1e-2", "train.logging_steps=1", "train.warmup_ratio=0",
                             "method.dropout=0.0", f"output.dir={tmp_path / 'ck'}", f"output.logs_dir={tmp_path / 'logs'}"])
    result = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses

    base = AutoModelForCausalLM.from_pretrained(arch_dirs[arch])
    tied = bool(methods.tied_module_names(base))
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)  # the reloaded adapter does something
    merged = methods.merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned, atol=1e-4, rtol=1e-4)
    assert bool(methods.tied_module_names(merged)) == tied


# prefix tuning on Falcon's multi-query attention needs the one-KV-head prefix (see methods._kv_heads).
@pytest.mark.parametrize("method", methods.METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_builds_trains_and_generates(arch, method, arch_dirs):
    from transformers import AutoTokenizer

    path = arch_dirs[arch]
    q = methods.effective_quantization(method, "none")
    torch.manual_seed(0)
    model = load_model(str(path), "float32", q)  # the product's loader: CPU 4-bit kernel limits applied
    tok = AutoTokenizer.from_pretrained(path)
    options = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
               "p_tuning": {"num_virtual_tokens": 4}}.get(method, {})
    model = methods.apply_method(model, MethodConfig(name=method, **options), total_steps=10, tokenizer=tok,
                                 tokenizer_path=str(path))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    enc = tok([json.dumps(r) for r in extraction_rows(2)], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"]).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())
    model.eval()
    # The project's generation is the trained model's own greedy continuation (a prefix included).
    from generation_helpers import greedy_continuation

    from llm_finetune.generate import generate_batch

    prompt = tok(json.dumps(extraction_rows(1)[0]))["input_ids"]
    gen = generate_batch(model, tok, [prompt], [tok.eos_token_id], max_new_tokens=3)[0]
    expected = greedy_continuation(model, prompt, [tok.eos_token_id], 3)
    assert (gen.text, gen.new_tokens) == (tok.decode(expected, skip_special_tokens=True), len(expected))


@pytest.mark.parametrize("arch,expected", [("gpt2", "c_attn"), ("falcon", "query_key_value"), ("llama", "q_proj"),
                                           ("gemma2", "o_proj")])
def test_unmatched_target_names_the_architecture_modules(arch, expected, arch_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch_dirs[arch])
    with pytest.raises(MethodError, match=rf"\['nope'\] match no module.*{expected}"):
        methods.apply_method(model, MethodConfig(name="lora", target_modules=["nope"]))


@pytest.mark.parametrize("arch,target", [("gpt2", "c_attn"), ("falcon", "query_key_value")])
def test_fused_targets_by_name(arch, target, arch_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch_dirs[arch])
    model = methods.apply_method(model, MethodConfig(name="lora", target_modules=[target]))
    adapted = {n.rsplit(".", 3)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 2 and all(n.endswith(target) for n in adapted)  # one per block


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_compute_each_example_alone_or_packing_is_refused(arch, arch_dirs, tmp_path):
    """Every family that switches to padding-free attention computes each example of a packed row as it
    does alone (positions and bounds reach its attention); one that cannot (Gemma 2: soft-capped eager
    attention; Falcon: no attention function) says why, trains on padded rows when train.packing is null
    (test_lora_trains_saves_reloads_and_merges) and refuses when it is true."""
    from llm_finetune.attention import use_padding_free_attention
    from llm_finetune.data.collate import PaddingFreeCollator
    from llm_finetune.train import run

    model = load_model(str(arch_dirs[arch])).eval()
    features = [{"input_ids": list(range(10 + n, 10 + 2 * n)), "labels": list(range(n))} for n in (6, 1, 13, 4)]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features])
        why_not = use_padding_free_attention(model)
        if arch in ("gemma2", "falcon"):
            assert why_not and type(model).__name__ in why_not
            assert model.config._attn_implementation != "varlen_sdpa"
        else:
            assert why_not is None
            batch = PaddingFreeCollator()(features)
            packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
            torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    if arch == "gemma2":
        write_jsonl(tmp_path / "train.jsonl", extraction_rows(4))
        with pytest.raises(MethodError, match="train.packing=true: Gemma2ForCausalLM .* set train.packing=false"):
            run(load_config(None, [f"model.name_or_path={arch_dirs[arch]}", f"data.train_file={tmp_path / 'train.jsonl'}",
                                   "data.eval_file=null", "train.max_steps=1", "train.packing=true",
                                   f"output.dir={tmp_path / 'ck'}", f"output.logs_dir={tmp_path / 'logs'}"]))

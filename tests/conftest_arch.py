"""Tiny random models of each architecture family the project promises, built from configs offline.

Each mirrors the real family's structure where it matters to the methods: GPT-2's fused Conv1D
`c_attn`, Falcon-7B's fused `query_key_value` with multi-query attention, Gemma 2's soft-capped
hybrid attention, grouped-query attention for Llama/Mistral/Qwen2.
"""

from __future__ import annotations

from pathlib import Path


def arch_configs(tokenizer) -> dict:
    import transformers as T

    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id)
    decoder = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    return {
        "llama": T.LlamaConfig(**decoder, tie_word_embeddings=True),
        "mistral": T.MistralConfig(**decoder, tie_word_embeddings=False),
        "qwen2": T.Qwen2Config(**decoder, tie_word_embeddings=True),
        "gemma2": T.Gemma2Config(**decoder, head_dim=12, sliding_window=64),
        "falcon": T.FalconConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, multi_query=True, parallel_attn=True,
                                 new_decoder_architecture=False, bias=False, alibi=False, **ids),
        "gpt2": T.GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=2, n_head=4, n_positions=512, **ids),
    }


ARCHS = ["llama", "mistral", "qwen2", "gemma2", "falcon", "gpt2"]


def build_arch(path: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_configs(tokenizer)[arch])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

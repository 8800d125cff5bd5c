"""Generation with the training template: one prompt, or many in left-padded batches."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended by an end-of-turn / EOS token rather than the length cap


def load_for_inference(model_path: str = "default", adapter: str | None = None, dtype: str = "auto",
                       quantization: str = "none"):
    """Base model (+ adapter). The tokenizer and template come from the adapter when it has them,
    so inference uses exactly the template the adapter was trained with."""
    from .models import load_model, load_tokenizer, resolve_source

    source = resolve_source(model_path)
    tok_path = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else source.load_path
    tokenizer = load_tokenizer(tok_path)
    model = load_model(source, dtype=dtype, quantization=quantization)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The adapter's template added special tokens; their trained rows come with the adapter.
        model.resize_token_embeddings(len(tokenizer))
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            if (Path(adapter) / "config.json").is_file():  # what method.name=full writes
                raise FileNotFoundError(f"{adapter}: a complete model (full fine-tuning), not an adapter; "
                                        f"pass it as --model {adapter}")
            raise FileNotFoundError(f"{adapter}: not an adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def _generation_kwargs(max_new_tokens, eos_ids, pad_id, do_sample, temperature, top_p) -> dict:
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # override sampling defaults a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], eos_ids: list[int], max_new_tokens: int = 64,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int | None = None) -> list[Generation]:
    """Generate for prompts (token ids) together, left padded; return the decoded answers."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(p)
        attention[i, width - len(p):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = _generation_kwargs(max_new_tokens, eos_ids, pad, do_sample, temperature, top_p)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    results = []
    for row in out[:, width:].tolist():
        stop_at = next((j for j, t in enumerate(row) if t in eos_ids), None)
        tokens = row if stop_at is None else row[:stop_at]
        results.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), stop_at is not None))
    return results


def stream_one(model, tokenizer, prompt_ids: list[int], eos_ids: list[int], max_new_tokens: int = 256,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               out=None) -> Generation:
    """Generate one answer, printing it as it is produced."""
    from transformers import TextStreamer

    out = out or sys.stdout  # looked up now, not at import, so redirected stdout is honoured

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text)
            out.flush()

    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generation_kwargs(max_new_tokens, eos_ids, tokenizer.pad_token_id, do_sample, temperature, top_p)
    kwargs["streamer"] = streamer
    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.as_tensor([prompt_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = output[0, ids.shape[1]:].tolist()
    stop_at = next((j for j, t in enumerate(new) if t in eos_ids), None)
    tokens = new if stop_at is None else new[:stop_at]
    out.write("\n")
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), stop_at is not None)

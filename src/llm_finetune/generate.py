"""Generation with the training template: one prompt, or many in left-padded batches."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .artifacts import open_adapter
from .manifest import write_jsonl
from .models import load_model, load_tokenizer, resolve_source


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended by an end-of-turn / EOS token rather than the length cap


def load_for_inference(model_path: str = "default", adapter: str | None = None, dtype: str = "auto",
                       quantization: str = "none", allow_pickle: bool = False):
    """Base model (+ adapter). The tokenizer and template come from the adapter when it has them,
    so inference uses exactly the template the adapter was trained with. Weights from safetensors
    only unless `allow_pickle` (--allow-pickle)."""
    folder = open_adapter(adapter, "--adapter", allow_pickle) if adapter else None
    source = resolve_source(model_path)
    tokenizer = load_tokenizer(folder.tokenizer_path(source.load_path) if folder else source.load_path)
    # The adapter's template may have added special tokens; their trained rows come with the adapter.
    model = load_model(source, dtype=dtype, quantization=quantization, tokenizer=tokenizer, cpu_4bit_packing=True,
                       allow_pickle=allow_pickle)
    if folder:
        from peft import PeftModel  # imports a good part of PEFT: only when an adapter is applied

        model = PeftModel.from_pretrained(model, str(folder.path))
    model.eval()
    return model, tokenizer


def _generation_kwargs(max_new_tokens, eos_ids, pad_id, do_sample, temperature, top_p) -> dict:
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # override sampling defaults a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _generate(model, **kwargs):
    """model.generate that keeps a prompt-learning adapter (prefix, prompt or p-tuning) in the answer.

    PEFT 0.21 hooks generation through `past_key_values`, the name transformers 5 renamed to `cache`:
    its hook never sees generate's cache, so it injects the prefix (or virtual tokens) anew at every
    step, and the model keeps `cache` and drops `past_key_values` (deprecate_kwarg). The answers then
    differ from the trained model's from the first token (prefix) or the second (prompt tuning). The
    cache is handed to PEFT's hook under the old name and back to the model under the new one."""
    import functools

    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return model.generate(**kwargs)
    base_prepare, prepare = model.base_model_prepare_inputs_for_generation, model.prepare_inputs_for_generation

    @functools.wraps(base_prepare)
    def base_prepare_old_name(*args, **kw):
        inputs = base_prepare(*args, **kw)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    @functools.wraps(prepare)  # generate inspects its signature
    def prepare_new_name(*args, **kw):
        inputs = prepare(*args, **kw)
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.base_model_prepare_inputs_for_generation = base_prepare_old_name
    model.prepare_inputs_for_generation = prepare_new_name  # PEFT's generate installs it on the base model
    try:
        return model.generate(**kwargs)
    finally:
        model.base_model_prepare_inputs_for_generation = base_prepare
        del model.prepare_inputs_for_generation


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
    out = _generate(model, input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
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
        output = _generate(model, input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = output[0, ids.shape[1]:].tolist()
    stop_at = next((j for j, t in enumerate(new) if t in eos_ids), None)
    tokens = new if stop_at is None else new[:stop_at]
    out.write("\n")
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), stop_at is not None)


# ---------------------------------------------------------------------------------------------
# Settings shared by generate, chat and predict


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> "Sampling":
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                    temperature=self.temperature or 1.0, top_p=self.top_p, seed=self.seed)


def base_for(model: str | None, adapter: str | None) -> str:
    """--model when given; with an adapter, the base it was trained on; else the built-in default."""
    if model:
        return model
    if adapter:
        return open_adapter(adapter, "--adapter", allow_pickle=True).base_model()  # its manifest only, no weights
    return "default"


def _context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------
# Chat


def chat_loop(model, tokenizer, encoder, lines, out=None, sampling: Sampling | None = None,
              interactive: bool = False) -> list[dict]:
    """A multi-turn conversation: each line is a user turn; `/reset` forgets, `/exit` (or end of input) ends.

    Works the same with a terminal or a piped script of turns; returns the final history.
    """
    out = out or sys.stdout
    sampling = (sampling or Sampling()).check()
    eos_ids = encoder.generation_eos_ids()
    limit = _context_limit(model)
    history: list[dict] = []

    def prompt():
        if interactive:
            out.write("you> ")
            out.flush()

    prompt()
    for raw in lines:
        text = raw.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history = []
            out.write("[history cleared]\n")
            prompt()
            continue
        if not command:
            prompt()
            continue
        history.append({"role": "user", "content": text})
        ids = encoder.encode_prompt(history)
        # Forget the oldest exchanges rather than overflow the context window.
        while limit and len(ids) + sampling.max_new_tokens > limit and len(history) > 1:
            history = history[2:]
            ids = encoder.encode_prompt(history)
        if interactive:
            out.write("assistant> ")
        gen = stream_one(model, tokenizer, ids, eos_ids, out=out, **sampling.kwargs())
        history.append({"role": "assistant", "content": gen.text})
        prompt()
    return history


# ---------------------------------------------------------------------------------------------
# Batch prediction


def predict_file(model, tokenizer, encoder, prompts, out_path, batch_size: int = 8,
                 sampling: Sampling | None = None, progress: bool = True) -> int:
    """Generate for every prompt row in left-padded batches and write one JSON line per row, in input order.

    Prompts are grouped by length so batches carry little padding; the file appears only when complete.
    """
    from tqdm.auto import tqdm

    sampling = (sampling or Sampling()).check()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    eos_ids = encoder.generation_eos_ids()
    encoded = [encoder.encode_prompt(p.messages) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[Generation | None] = [None] * len(prompts)
    kw = sampling.kwargs()
    with tqdm(total=len(prompts), desc="predict", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            gens = generate_batch(model, tokenizer, [encoded[i] for i in idx], eos_ids, **kw)
            for i, g in zip(idx, gens):
                results[i] = g
            bar.update(len(idx))
    rows = []
    for p, g in zip(prompts, results):
        row = {"source": p.source, "messages": p.messages, "prediction": g.text, "stopped": g.stopped,
               "new_tokens": g.new_tokens}
        if p.reference is not None:
            row["reference"] = p.reference
        rows.append(row)
    write_jsonl(out_path, rows)  # the file appears only when complete
    return len(prompts)

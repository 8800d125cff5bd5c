"""Padding-free attention: several examples in one row, each attending only to itself, with no mask.

The padding-free collator (data/collate.py) puts a batch's examples end to end in one row and says
where each starts: `cu_seq_lens_q` (cumulative lengths, the flash-attention varlen convention, which
transformers passes from the model's forward down to every attention call) and `position_ids` that
restart at 0 for each example (so rotary positions are those of the example alone).

Stock `sdpa` would see such a row, find the restarts in `position_ids` and build a dense
(tokens x tokens) block-diagonal mask: on a CPU that mask costs more than the padding it saves. Here
the registered implementation `varlen_sdpa` runs `scaled_dot_product_attention(is_causal=True)` once
per example instead (the fused causal kernel, no mask made at all). Anything else (a padded batch
with its mask, generation with a cache, one example per row) goes to transformers' own sdpa, so a
model switched to it still evaluates and generates exactly as before.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .data.collate import PaddingFreeCollator

IMPLEMENTATION = "varlen_sdpa"


def example_spans(cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None,
                  length: int) -> list[tuple[int, int, int]] | None:
    """(row, start, end) of every example in a packed batch; None when no row holds more than one.

    `cu_seq_lens` (one packed row) is what the collator sends; without it, examples start wherever
    `position_ids` do not continue by one (transformers' own rule for packed rows)."""
    if cu_seq_lens is not None:
        bounds = cu_seq_lens.tolist()
        if bounds[-1] != length:
            raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]} but the packed row has {length} tokens")
        spans = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    elif position_ids is not None:
        spans = []
        for row, pos in enumerate(position_ids.tolist()):
            starts = [0] + [i for i in range(1, len(pos)) if pos[i] != pos[i - 1] + 1]
            spans += [(row, s, e) for s, e in zip(starts, starts[1:] + [len(pos)])]
    else:
        return None
    rows = [row for row, _, _ in spans]
    return spans if len(rows) != len(set(rows)) else None


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Causal attention within each example of a packed row; transformers' sdpa for everything else."""
    length = query.shape[2]
    spans = None
    if attention_mask is None and key.shape[2] == length > 1:
        spans = example_spans(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), length)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    pieces: dict[int, list[torch.Tensor]] = {}
    for row, start, end in spans:
        pieces.setdefault(row, []).append(torch.nn.functional.scaled_dot_product_attention(
            query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
            dropout_p=dropout, scale=scaling, is_causal=True))
    out = torch.cat([torch.cat(pieces[row], dim=2) for row in sorted(pieces)], dim=0)
    return out.transpose(1, 2).contiguous(), None


def varlen_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """No mask for a training-shaped batch without padding (the attention finds the examples itself);
    sdpa's mask for everything else (padding, a cache)."""
    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def register() -> None:
    """Make `varlen_sdpa` a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, varlen_sdpa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, varlen_sdpa_mask)


def use_padding_free_attention(model) -> str | None:
    """Switch the transformers model inside `model` (a PEFT wrapper or not) to `varlen_sdpa`, then check
    on two short examples that a packed row computes each as it does alone. Returns None when done, else
    why this model cannot, with the model left as it was: its attention has no sdpa form (Gemma 2's
    soft-capped eager attention), it does not take an attention function (Falcon), or the check failed
    (the positions or bounds do not reach its attention)."""
    register()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside a PeftModel
    name = type(inner).__name__
    if isinstance(inner, PreTrainedModel) and inner.config._attn_implementation == IMPLEMENTATION:
        return None  # switched and checked already (setup switches it; build_trainer only makes sure)
    if not isinstance(inner, PreTrainedModel) or not type(inner)._can_set_attn_implementation():
        return f"{name} does not take an attention function (transformers' AttentionInterface)"
    before = inner.config._attn_implementation
    try:
        inner.set_attn_implementation(IMPLEMENTATION)
    except (ValueError, ImportError) as e:
        return f"{name} has no sdpa attention to run per example ({str(e).split('. ')[0]})"
    if inner.config._attn_implementation != IMPLEMENTATION:
        return f"{name} kept its attention {inner.config._attn_implementation!r}"
    gap = _packed_gap(model)
    if gap is not None:
        inner.set_attn_implementation(before)
        return f"{name}: a packed row did not compute its examples as they are alone (logits differ by {gap:.3g})"
    return None


def _packed_gap(model) -> float | None:
    """None when two short examples packed in one row give the logits they give alone, else the gap."""
    features = [{"input_ids": [(7 * i + 3) % 97 for i in range(n)], "labels": [0] * n} for n in (5, 3)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]], device=device)).logits[0].float()
                               for f in features])
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                     for k, v in PaddingFreeCollator()(features).items() if k != "labels"}
            packed = model(**batch).logits[0].float()
    finally:
        model.train(was_training)
    gap = float((packed - alone).abs().max())
    return None if gap <= 1e-2 * float(alone.abs().max()) + 1e-4 else gap

"""What a generation check compares against: the model's own greedy continuation, one forward pass per token."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_continuation(model, prompt: list[int], eos_ids: list[int], max_new_tokens: int) -> list[int]:
    """Argmax of the full (uncached) forward pass, token by token, until an end id or the length cap.

    A length fixed by min_new_tokens == max_new_tokens proves nothing about what was generated; equality
    with this does: it fails when generation skips the adapter, the template's stop ids or the padding."""
    tokens, seq = [], torch.tensor([prompt], device=next(model.parameters()).device)
    while len(tokens) < max_new_tokens:
        token = int(model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax())
        if token in eos_ids:
            break
        tokens.append(token)
        seq = torch.cat([seq, torch.tensor([[token]], device=seq.device)], dim=1)
    return tokens

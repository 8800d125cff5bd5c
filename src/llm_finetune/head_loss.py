"""The causal-LM loss computed only where a token is trained, with the output head run in chunks.

The output head is about a fifth of a small model's compute, and its (tokens x vocabulary) logits are the
largest activation of a training step: 49,152 floats per token for SmolLM2, kept for the backward pass in
fp32 and again in the compute dtype. Prompt and padding positions need neither. So the model is run up to
its final hidden states, the hidden states of the positions whose next token is trained are taken, and the
head and cross-entropy run over them a chunk at a time: each chunk's logits live only while its loss and
its gradient with respect to the hidden states are computed (the gradient kept for the backward pass is
tokens x hidden, 85 times smaller here), as Liger-Kernel's fused linear cross-entropy does on GPUs.

Same value and gradients as the model's own loss (tests/test_trainer.py): the sum of cross-entropy over the
trained tokens. Used where the model's head is a plain frozen linear layer applied to the last hidden state
(the architectures in PLAIN_HEAD; LoRA family and IA3 leave the head frozen); otherwise the head runs at the
trained positions in one piece (`logits_to_keep`), which also applies a model's own logit scaling or
soft-capping.
"""

from __future__ import annotations

import inspect

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .data.tokenize import IGNORE_INDEX

# Architectures whose causal-LM forward is exactly `lm_head(final hidden state)`: no logit scaling or
# soft-capping, no auxiliary loss added to the model's own.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "gemma"}
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32, about 340 tokens of a 49k vocabulary


def trained_tokens_loss(model, unwrapped, inputs: dict, scale) -> torch.Tensor:
    """The sum of cross-entropy over the trained tokens of a batch with `labels`, times `scale` (1 / the
    tokens it is averaged over). The scale is applied before the gradients are rounded to the compute dtype,
    where the unchunked computation applies it.

    `model` is what the Trainer calls (it may be wrapped for several processes: the forward must go through
    it), `unwrapped` the model inside."""
    labels = inputs["labels"]
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    head = unwrapped.get_output_embeddings()
    if _plain_head(unwrapped, head):
        return ChunkedHeadCrossEntropy.apply(_hidden_where_trained(model, rest, trained), head.weight, head.bias,
                                             targets[trained], chunk_tokens(head.weight.shape[0]), scale)
    logits, kept = _logits_where_trained(model, rest, targets)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), kept.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss * scale


def scores_where_trained(model) -> bool:
    """Can `trained_token_loss_sums` score this model? Not where the positions are not the model's own
    (prompt tuning and p-tuning prepend virtual tokens), nor for a (remote-code) model whose forward takes no
    `logits_to_keep` (it always computes every position's logits)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def trained_token_loss_sums(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Per row of a batch: the summed cross-entropy over its trained tokens, for scoring (no gradient), where
    `scores_where_trained(model)`. The head runs only where a token is trained, as in training: a plain head
    in chunks over the trained positions' hidden states, any other head at the positions trained in some row
    (`logits_to_keep`). So scoring a batch of 24 rows of 256 tokens holds a few chunks of logits instead of
    24 x 256 x vocabulary (1.2 GB for SmolLM2) twice over. Same products in the same dtype as the full head's
    (the weight's; under `keep_activations_fp32` its bf16 output is handed back as fp32)."""
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    rest = {"input_ids": input_ids, "attention_mask": attention_mask}
    head = model.get_output_embeddings()
    if not _plain_head(model, head, frozen=False):
        logits, kept = _logits_where_trained(model, rest, targets)
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), kept.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view(kept.shape).sum(dim=1)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    selected, wanted, rows = _hidden_where_trained(model, rest, trained), targets[trained], trained.nonzero()[:, 0]
    weight, bias = head.weight, head.bias
    chunk = chunk_tokens(weight.shape[0])
    for start in range(0, selected.shape[0], chunk):
        logits = torch.nn.functional.linear(selected[start:start + chunk].to(weight.dtype), weight, bias).float()
        losses = torch.nn.functional.cross_entropy(logits, wanted[start:start + chunk], reduction="none")
        sums.index_add_(0, rows[start:start + chunk], losses)
    return sums


def _hidden_where_trained(model, rest: dict, trained: torch.Tensor) -> torch.Tensor:
    """The last hidden states of the positions whose next token is trained (tokens x hidden). The head runs on
    no position at all (an empty index): the model stops at its last hidden state."""
    nowhere = torch.zeros(0, dtype=torch.long, device=trained.device)
    hidden = model(**rest, logits_to_keep=nowhere, output_hidden_states=True).hidden_states[-1]
    return hidden[:, :-1][trained]


def _logits_where_trained(model, rest: dict, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits at the positions trained in any row, and those positions' targets (rows x kept)."""
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return model(**rest, logits_to_keep=keep).logits.float(), targets[:, keep]


def chunk_tokens(vocabulary: int) -> int:
    return max(16, CHUNK_ELEMENTS // vocabulary)


def _plain_head(unwrapped, head, frozen: bool = True) -> bool:
    """`lm_head(final hidden state)` is the model's whole head; `frozen`: and it trains nothing (the chunked
    autograd function computes no gradient for it; scoring, without gradients, does not ask)."""
    config = getattr(unwrapped, "config", None)
    plain = (getattr(config, "model_type", None) in PLAIN_HEAD and isinstance(head, torch.nn.Linear)
             and not isinstance(head, BaseTunerLayer))
    return plain and (not frozen or (not head.weight.requires_grad
                                     and (head.bias is None or not head.bias.requires_grad)))


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """scale x the sum over rows of cross_entropy(hidden @ weight.T + bias, targets), a chunk of rows at a
    time, for a frozen head. The forward computes each chunk's gradient with respect to `hidden` while its logits exist
    and keeps only that; the backward scales it. The matrix products run in the dtype the surrounding
    autocast would give them (or the weight's), the softmax in fp32, as the unchunked computation does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                logits = torch.nn.functional.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), y] -= 1  # d(cross-entropy)/d(logits)
                grad_hidden[start:start + chunk] = (probs.mul_(scale).to(dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None

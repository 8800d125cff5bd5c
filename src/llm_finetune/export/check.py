"""Logit checks: an artifact is compared with the model it came from before it is put in place.

`compare` reports the largest |logit| difference against a tolerance relative to the logit scale,
and fails a next-token argmax that flips where the reference had a clear winner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.tokenize import ChatEncoder

# Prompts the checks run on: short, mixed scripts, so tokenizer and weights are both exercised.
CHECK_PROMPTS = [
    "Extract name, age and city as JSON.\n\nAna Silva, 20, lives in Lisbon.",
    "What is the capital of France?",
    "Привет! 今天天气很好。 0123456789",
]



def prompt_ids(tokenizer) -> list[list[int]]:
    try:
        encoder = ChatEncoder(tokenizer)
        return [encoder.encode_prompt([{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
    except ValueError:  # no usable chat template: plain text still exercises the weights
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in CHECK_PROMPTS]


def logits_for(model, prompts: list[list[int]]) -> list:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in prompts:
            t = torch.as_tensor([ids], device=device)
            out.append(model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0].float().cpu())
    return out


def max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@dataclass
class Check:
    what: str
    max_abs_diff: float
    tolerance: float
    scale: float  # largest |logit| of the reference, for reading the difference
    argmax_agreement: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    clear_disagreements: int = 0  # positions whose argmax differs although the reference's top-2 gap is wide
    informational: bool = False  # reported, never a reason to refuse (e.g. the 4-bit quantisation gap)

    @property
    def ok(self) -> bool:
        return self.informational or (self.max_abs_diff <= self.tolerance and not self.clear_disagreements)

    def line(self) -> str:
        verdict = "(for information)" if self.informational else "OK" if self.ok else "FAILED"
        relative = self.max_abs_diff / max(self.scale, 1e-12)
        bound = "" if self.informational else f"tolerance {self.tolerance:.3g}, "
        return (f"{self.what}: max |logit diff| = {self.max_abs_diff:.3g} ({relative:.2g} of the largest |logit| "
                f"{self.scale:.3g}; {bound}next-token argmax agreement {self.argmax_agreement:.1%}) {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "largest_abs_logit": self.scale, "argmax_agreement": self.argmax_agreement,
                "clear_argmax_disagreements": self.clear_disagreements, "ok": self.ok,
                "informational": self.informational}


# How far two float32 forward passes of the same function may drift apart, relative to the logit
# scale. Merging changes the order of float operations (W x + B(A x) becomes (W + BA) x), and
# which kernels run (AVX-512 vs AMX tiles, thread count) changes the accumulation order too, so the
# gap grows with the size of the logits: the main job's adapter on SmolLM2-135M measured 2.5e-4 at
# a largest |logit| of 55 on an AMX CPU (4.6e-6 relative). 1e-4 of the scale leaves a 20x margin,
# while a real merge error (a lost scaling, a skipped layer, dropout left on) moves logits by the
# adapter's own effect, orders of magnitude more. Small logits keep an absolute floor of 1e-4.
FP32_RELATIVE_TOLERANCE = 1e-4


def tolerance_for(scale: float, relative: float = FP32_RELATIVE_TOLERANCE) -> float:
    """The allowed max |logit diff| for a reference whose largest |logit| is `scale`."""
    return relative * max(1.0, scale)


def compare(what: str, ref: list, got: list, tolerance: float | None = None,
            relative: float = FP32_RELATIVE_TOLERANCE) -> Check:
    """Compare logits position by position. `tolerance` None: scale-relative (`tolerance_for`).

    Besides the largest difference, a next-token argmax that differs where the reference's top-2
    gap is wider than twice the tolerance fails the check (a near-tie may flip; a clear winner not)."""
    scale = max(float(r.abs().max()) for r in ref)
    tol = tolerance_for(scale, relative) if tolerance is None else tolerance
    agree, clear = [], 0
    for r, g in zip(ref, got):
        same = r.argmax(-1) == g.argmax(-1)
        agree.append(same.float())
        top2 = r.topk(2, dim=-1).values
        clear += int(((top2[..., 0] - top2[..., 1]) > 2 * tol).logical_and(~same).sum())
    agreement = torch.cat(agree).mean().item()
    return Check(what, max_abs_diff(ref, got), tol, scale, agreement, clear_disagreements=clear)

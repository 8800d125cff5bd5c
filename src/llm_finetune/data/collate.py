"""Batches of encoded examples: dynamic right padding, labels padded with -100.

Kept separate from the trainer so a packing collator (padding-free, attention per example) can
replace it without touching the data step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenize import IGNORE_INDEX


@dataclass
class PaddingCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            attention[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

"""Batches of encoded examples: right-padded rows (labels padded with -100), or padding-free rows; and the
order examples are drawn in when train.group_by_length asks for batches of similar length.

`train.packing` chooses the collator (trainer.build_trainer); the data step is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

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
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, **_examples(features)}


@dataclass
class PaddingFreeCollator:
    """A batch's examples end to end in one row: no padding token is computed.

    Each example keeps its own positions (`position_ids` restart at 0) and its bounds travel as
    `cu_seq_lens_q`/`cu_seq_lens_k` (cumulative lengths) with `max_length_q`/`max_length_k`, the
    varlen convention transformers passes to the attention: `attention.varlen_sdpa` on a CPU, flash
    attention's varlen kernels on a GPU. The first token of every example is never a target, so no
    example learns to predict its first token from the end of the one before it; the examples'
    other labels are kept exactly. No attention mask is sent: with stock sdpa the model would build a
    dense block mask from the restarting positions instead (correct, but slow)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        labels = []
        for f in features:
            own = list(f["labels"])
            own[0] = IGNORE_INDEX
            labels += own
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(lengths)
        return {
            "input_ids": torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long)[None],
            "labels": torch.tensor(labels, dtype=torch.long)[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
            **_examples(features),
        }


EXAMPLE_KEY = "example_index"


def _examples(features: list[dict], column: str = "example") -> dict[str, torch.Tensor]:
    """Which training examples the batch holds, from each feature's `column` (the trainer takes it out before
    the forward pass, to name them when a step goes wrong)."""
    if not features or column not in features[0]:
        return {}
    return {EXAMPLE_KEY: torch.tensor([int(f[column]) for f in features])}


class NamingExamples:
    """Another collator, plus which training examples the batch holds (EXAMPLE_KEY) read from each feature's
    `column`: for collators that keep only the keys they know (TRL's preference collators)."""

    def __init__(self, collate, column: str):
        self.collate, self.column = collate, column

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        batch.update(_examples(features, self.column))
        return batch


class GlobalLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping (shuffle, sort within mega-batches of similar length), grouped by the
    *global* batch (batch size x accumulation x processes) and seeded per epoch. The stock sampler groups by
    the per-process batch and draws from the global random state, so 1 process and N processes with the same
    global batch would train on different examples in a step; here the order depends only on the seed, the
    epoch and the global batch: the launcher deals each optimizer step's consecutive examples out to the
    processes, and a resume (whatever its process count) continues the same order."""

    def __init__(self, global_batch: int, lengths: list[int], seed: int):
        super().__init__(global_batch, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

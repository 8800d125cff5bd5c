"""Did the fine-tune help? Eval loss and a task metric, base vs tuned, each rate with its interval."""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .data.collate import PaddingCollator
from .data.tokenize import IGNORE_INDEX, ChatEncoder, Encoded
from .data.records import Example
from .generate import generate_batch

# ---------------------------------------------------------------------------------------------
# Metrics: each takes (prediction, reference) and returns True/False.


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def json_match(prediction: str, reference: str) -> bool:
    """Valid JSON object with exactly the reference's keys (the format is right, values aside)."""
    try:
        got = json.loads(prediction.strip())
    except json.JSONDecodeError:
        return False
    try:
        want = json.loads(reference)
    except json.JSONDecodeError:
        return isinstance(got, dict)
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want)
    return type(got) is type(want)


METRICS: dict[str, Callable[[str, str], bool]] = {"exact_match": exact_match, "json": json_match}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; well behaved at 0 and n, unlike the normal one."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(a: list[bool], b: list[bool], resamples: int = 2000, seed: int = 0,
                               level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of mean(b) - mean(a) over the same examples (paired)."""
    n = len(a)
    if n == 0:
        return (-1.0, 1.0)
    rng = random.Random(seed)
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int((1 - level) / 2 * resamples)]
    hi = stats[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


# ---------------------------------------------------------------------------------------------
# Model evaluation


@torch.no_grad()
def eval_loss(model, encoded: list[Encoded], pad_token_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean cross-entropy over supervised tokens (token-weighted, not batch-weighted), and perplexity."""
    collate = PaddingCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(encoded), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded[i:i + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # Prompt tuning and p-tuning prepend their virtual tokens' positions to the logits.
        logits = logits[:, -batch["labels"].shape[1]:]
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        total += loss.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}


@dataclass
class ModelScores:
    name: str
    loss: dict[str, float]
    metric: str
    hits: list[bool]
    predictions: list[str]
    stop_rate: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return sum(self.hits) / max(len(self.hits), 1)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(sum(self.hits), len(self.hits))
        return {"name": self.name, "eval_loss": self.loss["loss"], "perplexity": self.loss["perplexity"],
                "loss_tokens": self.loss["tokens"], "metric": self.metric, "score": self.rate,
                "correct": sum(self.hits), "n": len(self.hits), "ci95": [lo, hi], "stop_rate": self.stop_rate,
                **self.extra}


def score_model(model, name: str, encoder: ChatEncoder, examples: list[Example], encoded: list[Encoded],
                metric: str = "exact_match", max_new_tokens: int = 48, batch_size: int = 16) -> ModelScores:
    tokenizer = encoder.tokenizer
    loss = eval_loss(model, encoded, tokenizer.pad_token_id, batch_size)
    prompts = [encoder.encode_prompt(ex.prompt_messages) for ex in examples]
    # Similar lengths together: less padding. Results go back to the original order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[Any] = [None] * len(prompts)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        gens = generate_batch(model, tokenizer, [prompts[j] for j in chunk], encoder.generation_eos_ids(),
                              max_new_tokens=max_new_tokens)
        for j, g in zip(chunk, gens):
            outputs[j] = g
    check = METRICS[metric]
    hits = [check(g.text, ex.answer) for g, ex in zip(outputs, examples)]
    stop_rate = sum(g.stopped for g in outputs) / max(len(outputs), 1)
    return ModelScores(name, loss, metric, hits, [g.text for g in outputs], stop_rate)


def compare_base_and_tuned(model, encoder: ChatEncoder, examples: list[Example], encoded: list[Encoded],
                           metric: str, max_new_tokens: int, batch_size: int,
                           compare_base: bool = True, base_model=None) -> dict[str, Any]:
    """Score the base (adapter disabled, or `base_model` when given) and the tuned model on the same
    prompts and template."""
    results = {}
    if compare_base and base_model is not None:
        results["base"] = score_model(base_model, "base", encoder, examples, encoded, metric, max_new_tokens,
                                      batch_size)
    elif compare_base:
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with ctx:
            results["base"] = score_model(model, "base", encoder, examples, encoded, metric, max_new_tokens, batch_size)
    results["tuned"] = score_model(model, "tuned", encoder, examples, encoded, metric, max_new_tokens, batch_size)
    report: dict[str, Any] = {name: s.to_dict() for name, s in results.items()}
    if "base" in results:
        lo, hi = paired_difference_interval(results["base"].hits, results["tuned"].hits)
        report["difference"] = {"score": results["tuned"].rate - results["base"].rate, "ci95": [lo, hi],
                                "eval_loss": results["tuned"].loss["loss"] - results["base"].loss["loss"]}
    report["examples"] = [
        {"source": ex.source, "reference": ex.answer, **{name: s.predictions[i] for name, s in results.items()}}
        for i, ex in enumerate(examples)
    ]
    return report


def format_table(report: dict[str, Any]) -> str:
    names = [n for n in ("base", "tuned") if n in report]
    metric = report[names[-1]]["metric"]
    rows = [("", *names)]
    rows.append(("eval loss", *(f"{report[n]['eval_loss']:.3f}" for n in names)))
    rows.append(("perplexity", *(f"{report[n]['perplexity']:.2f}" for n in names)))
    rows.append((metric, *(f"{report[n]['score']:.1%} ({report[n]['correct']}/{report[n]['n']})" for n in names)))
    rows.append(("  95% CI", *(f"[{report[n]['ci95'][0]:.1%}, {report[n]['ci95'][1]:.1%}]" for n in names)))
    rows.append(("stopped by EOS", *(f"{report[n]['stop_rate']:.1%}" for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if "difference" in report:
        d = report["difference"]
        lines.append(f"tuned - base {metric}: {d['score']:+.1%}, 95% CI [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}] "
                     f"(paired bootstrap); eval loss {d['eval_loss']:+.3f}")
    return "\n".join(lines)

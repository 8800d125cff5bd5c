#!/usr/bin/env python
"""What the evaluation adds to a run of the default config, timed piece by piece on the default model.

    python benchmarks/eval_cost.py [--examples 120] [--out benchmarks/results/eval_cost.md]

Pieces: one in-training eval-loss pass over the held-out set (train.eval_steps runs it every N
steps), greedy generation for one model on the held-out set, the regression set for one model,
all text metrics and intervals, and writing report.md/json with plots. Wall-clock seconds on this
machine; other processes may share the CPU, so treat them as upper bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=120)
    ap.add_argument("--out", default="benchmarks/results/eval_cost.md")
    args = ap.parse_args()

    import tempfile

    import torch

    from llm_finetune.config import load_config
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.report import write_report
    from llm_finetune.evaluation.score import compare_models, eval_loss, load_eval_set, options_from_config, score_model
    from llm_finetune.models import load_model, load_tokenizer, resolve_source

    cfg = load_config("config/lora_config.json")
    source = resolve_source(cfg.model.name_or_path)
    tok = load_tokenizer(source)
    model = load_model(source, "float32")
    model.eval()
    encoder = ChatEncoder(tok, cfg.data.max_length)
    examples, encoded = load_eval_set(cfg.data.eval_file, encoder, max_examples=args.examples)
    reg = load_eval_set(cfg.eval.regression_file, encoder)
    opts = options_from_config(cfg.eval)
    rows = []

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t))
        print(f"{name}: {rows[-1][1]:.1f} s", flush=True)
        return out

    timed(f"eval loss pass ({len(encoded)} examples, one in-training evaluation)",
          lambda: eval_loss(model, encoded, tok.pad_token_id, cfg.eval.batch_size))
    from contextlib import nullcontext

    report = timed(f"held-out set, one model: loss + greedy answers ({len(examples)} x {cfg.eval.max_new_tokens} "
                   "new tokens) + metrics", lambda: compare_models({"m": nullcontext}, model, encoder, examples,
                                                                   encoded, opts))
    timed(f"regression set, one model ({len(reg[0])} prompts)",
          lambda: score_model(model, "m", encoder, *reg, options=opts))
    from llm_finetune.evaluation.metrics import TEXT_METRICS

    predictions = [ex["m"]["prediction"] for ex in report["examples"]]
    timed("all text metrics on the held-out answers (inside the row above)",
          lambda: [fn(p, ex.answer) for p, ex in zip(predictions, examples) for fn in TEXT_METRICS.values()])
    with tempfile.TemporaryDirectory() as d:
        timed("write report.md/json + plots", lambda: write_report(report, d))

    lines = ["# Evaluation cost on the default model (CPU)", "",
             f"torch threads: {torch.get_num_threads()}; `os.getloadavg()` at the end: "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other engineers' processes shared these 2 cores, "
             "so these are upper bounds).", "", "| piece | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in rows]
    lines += ["", "Default config: no in-training evaluation (train.eval_steps is opt-in; each one costs the first "
              "row), the held-out set and the regression set for base and tuned (rows 2 and 3, twice each), one "
              "report."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Scoring's loss pass with the output head only at trained positions, against every position's logits.

    PYTHONPATH=src python benchmarks/eval_loss_head.py [--adapter checkpoints/adapter_model] [--repeats 2]

The main job's evaluation (config/lora_config.json: eval batch 24, max length 256) scores the held-out set
and the regression set for the base and the tuned model. Each way below runs in its own process, the ways
alternating, `--repeats` times: the built-in model in the precision `model.dtype: auto` picks here, the
adapter, then `example_losses` over the held-out rows and the regression rows:

- `every-position`: the model's logits at every position (batch x length x vocabulary), then cross-entropy
  over the trained tokens (how `evaluation/score.example_losses` scored until 2026-11-30);
- `where-trained`: `example_losses` as it is now (`head_loss.trained_token_loss_sums`).

Per way: seconds, the process's peak RSS (GB, 1e9 bytes, as the run manifest gives it) before and after scoring,
and the summed loss (the same both ways).
Results: benchmarks/results/eval_loss_head.json with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from throughput import cpu_info  # noqa: E402

WAYS = ("every-position", "where-trained")


def every_position_sums(model, features, pad_token_id, batch_size):
    import torch

    from llm_finetune.data.collate import PaddingCollator

    collate, sums = PaddingCollator(pad_token_id), []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            batch = collate(features[i:i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="none").view(labels.shape)
            sums.extend(loss.sum(dim=1).tolist())
    return sums


def child(way: str, adapter: Path, out: Path) -> None:
    from peft import PeftModel

    from llm_finetune.config import load_config
    from llm_finetune.cpu_memory import peak_rss_gb
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.evaluation.score import example_losses, load_eval_set
    from llm_finetune.models import load_model, load_tokenizer, resolve_source, run_precision

    cfg = load_config(str(ROOT / "config" / "lora_config.json")).resolved()
    source = resolve_source(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source)
    model = PeftModel.from_pretrained(load_model(source, run_precision(cfg)), str(adapter)).eval()
    encoder = ChatEncoder(tokenizer, cfg.data.max_length)
    rows = []
    for path in (cfg.data.eval_file, cfg.eval.regression_file):
        _, encoded = load_eval_set(str(ROOT / path), encoder)
        rows += [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    before = peak_rss_gb()
    start = time.perf_counter()
    if way == "every-position":
        sums = every_position_sums(model, rows, tokenizer.pad_token_id, cfg.eval.batch_size)
    else:
        sums, _ = example_losses(model, rows, tokenizer.pad_token_id, cfg.eval.batch_size)
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"way": way, "seconds": round(seconds, 2), "rows": len(rows),
                               "peak_rss_gb": peak_rss_gb(), "peak_rss_before_scoring_gb": before,
                               "loss_sum": sum(sums),
                               "precision": run_precision(cfg).to_dict()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=ROOT / "checkpoints" / "adapter_model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_loss_head.json")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.adapter, args.child_out)
        return
    if not (args.adapter / "adapter_config.json").exists():
        sys.exit(f"error: no adapter at {args.adapter}: run the main job first (make finetune), or pass --adapter DIR")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for round_ in range(args.repeats):
        for way in WAYS:
            out = args.out.with_suffix(f".{way}.tmp")
            subprocess.run([sys.executable, __file__, "--child", way, "--adapter", str(args.adapter), "--child-out",
                            str(out)], env=env, check=True, capture_output=True)
            runs.append({"round": round_ + 1, **json.loads(out.read_text())})
            out.unlink()
            r = runs[-1]
            print(f"round {round_ + 1} {way:15} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_gb']:.2f} GB "
                  f"(before scoring {r['peak_rss_before_scoring_gb']:.2f})  loss sum {r['loss_sum']:.4f}", flush=True)
    args.out.write_text(json.dumps({"cpu": cpu_info(), "adapter": str(args.adapter), "runs": runs}, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

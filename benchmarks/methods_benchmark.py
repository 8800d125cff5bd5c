#!/usr/bin/env python
"""Every method for 20 steps on the default model (SmolLM2-135M-Instruct), short sequences, on this machine.

    python benchmarks/methods_benchmark.py            # all methods, writes benchmarks/results/methods.md
    python benchmarks/methods_benchmark.py --one dora # one method, prints a JSON line

Each method runs in its own process (the real `train.run` path, evaluation off) so its peak resident
memory is its own. Each uses its default learning rate, so the loss columns double as a check that
the defaults move the model. Numbers are noisy where other processes share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["lora", "dora", "rslora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "full", "qlora"]
STEPS, BATCH, MAX_LENGTH, THREADS = 20, 2, 128, 1


def one(method: str) -> dict:
    from llm_finetune import methods as M
    from llm_finetune.config import load_config
    from llm_finetune.train import run

    out = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    extra = ["method.prompt_init_text=Answer the request as JSON."] if method == "prompt_tuning" else []
    cfg = load_config(None, [f"method.name={method}", f"data.train_file={ROOT / 'data/train.jsonl'}",
                             "data.eval_file=null", f"data.max_length={MAX_LENGTH}", f"train.max_steps={STEPS}",
                             f"train.batch_size={BATCH}", f"train.num_threads={THREADS}", "train.logging_steps=1", "train.warmup_ratio=0.1",
                             f"output.dir={out / 'ck'}", f"output.logs_dir={out / 'logs'}", *extra])
    started = time.time()
    result = run(cfg)
    t = result.manifest["training"]
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return {"method": method, "trainable": t["trainable_parameters"], "total": t["total_parameters"],
            "learning_rate": t["learning_rate"], "tokens_per_s": t["tokens_seen"] / t["train_runtime_s"],
            "train_runtime_s": t["train_runtime_s"], "wall_s": time.time() - started,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss_first": sum(losses[:3]) / 3, "loss_last": sum(losses[-3:]) / 3,
            "merge": "yes" if M.MERGEABLE[method] else ("not needed" if method == "full" else "no")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/methods.md"))
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one)))
        return 0
    rows = []
    for m in args.methods:
        proc = subprocess.run([sys.executable, __file__, "--one", m], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            rows.append({"method": m, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
        else:
            rows.append(json.loads(line[0][7:]))
        print(json.dumps(rows[-1]), flush=True)
        write_table(rows, args.out)
    print(f"written {args.out}")
    return 0


def write_table(rows: list[dict], out: str) -> None:
    import torch

    lines = [
        "# Methods benchmark",
        "",
        f"`python benchmarks/methods_benchmark.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{STEPS} optimizer steps per method on the default SmolLM2-135M-Instruct (float32), batch {BATCH}, "
        f"data/train.jsonl (max_length {MAX_LENGTH}), {THREADS} torch thread, each method at its default learning "
        "rate, evaluation off.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, no GPU. **Other engineers' processes shared these 2 cores while it ran, so "
        "tokens/s are noisy (compare them within a column only roughly).** Peak memory is the peak resident "
        "set of the process (model, data, Trainer, Python), not of the tensors alone. Loss is the mean of the "
        "first / last 3 logged steps.",
        "",
        "| method | trainable params | % of base | lr | tokens/s | peak RSS (MiB) | loss first→last (20 steps) | merge |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | | | | |")
            continue
        base = r["total"] - (0 if r["method"] == "full" else r["trainable"])
        lines.append(f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / base:.3f}% | "
                     f"{r['learning_rate']:g} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} | {r['merge']} |")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

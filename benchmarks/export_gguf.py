#!/usr/bin/env python
"""GGUF export of the built-in default model (SmolLM2-135M-Instruct): time, size, read-back difference.

    PYTHONPATH=src python benchmarks/export_gguf.py [--out benchmarks/results/export.md]

Also times batched vs one-by-one greedy `predict` on the same model (the outputs must be equal).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/export.md")
    args = parser.parse_args()

    import torch

    from llm_finetune.data.prompts import PromptRow
    from llm_finetune.data.tokenize import ChatEncoder
    from llm_finetune.export import gguf, merge, ollama
    from llm_finetune.generate import Sampling, load_for_inference, predict_file

    rows = ["| type | export + check (s) | size (MB) | max abs logit diff | largest abs logit | relative | tolerance (relative) | next-token argmax agreement |",
            "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("f16", "q8_0"):
            t = time.time()
            r = gguf.export_gguf(Path(tmp) / f"default-{qtype}.gguf", model="default", qtype=qtype)
            c = r.check
            rows.append(f"| {qtype} | {time.time() - t:.0f} | {r.path.stat().st_size / 1e6:.1f} | {c.max_abs_diff:.3g} | "
                        f"{c.scale:.3g} | {c.max_abs_diff / c.scale:.2e} | {gguf.GGUF_TOLERANCE[qtype]:g} | "
                        f"{c.argmax_agreement:.1%} |")
            print(rows[-1], flush=True)

        model, tokenizer = load_for_inference("default")
        encoder = ChatEncoder(tokenizer)
        prompts = [PromptRow([{"role": "user", "content": f"Give me {i + 1} short fact(s) about the number {i * 7}."}],
                             None, f"bench:{i}", "prompt") for i in range(8)]
        timing = {}
        preds = {}
        for bs in (1, 8):  # 8 = all prompts in one left-padded batch
            out = Path(tmp) / f"p{bs}.jsonl"
            t = time.time()
            predict_file(model, tokenizer, encoder, prompts, out, batch_size=bs, sampling=Sampling(max_new_tokens=16),
                         progress=False)
            timing[bs] = time.time() - t
            preds[bs] = out.read_text()
    same = preds[1] == preds[8]
    text = [
        "# GGUF export and batched predict on the default model",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. Other engineers' processes may have shared the "
        "CPU during this run, so times are indicative.",
        "",
        "`export --format gguf --model default` (the dequantised SmolLM2-135M-Instruct, float32 source). The check "
        "loads the file back with transformers and compares logits on 3 prompts; most of the time is gguf-py / "
        "transformers parsing the 49k-token vocabulary.",
        "",
        *rows,
        "",
        f"`predict`, 8 prompts, 16 new tokens, greedy: batch 1 {timing[1]:.1f} s, batch 8 {timing[8]:.1f} s "
        f"({timing[1] / timing[8]:.1f}x); outputs identical: {same}.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()

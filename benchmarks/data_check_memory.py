"""Peak memory of `llm-finetune data check` on large JSONL files: it must not grow with the file.

    PYTHONPATH=src python benchmarks/data_check_memory.py            # 100 MB and 1 GB (slow)
    PYTHONPATH=src python benchmarks/data_check_memory.py --quick    # 1 MB and 10 MB (a smoke run)

Generates JSONL files in a temporary folder under /tmp (deleted afterwards), runs `data check` on
each in a fresh subprocess, and reads that child's peak resident memory (ru_maxrss from wait4).
Results go to benchmarks/results/data_check_memory.md.

Two tokenizers:
  * the real default one (SmolLM2-135M-Instruct, through its own chat template), and
  * a word-level tokenizer built here (ChatML template), because the real byte-level BPE path runs
    at 0.3-0.8 MB/s on this shared 2-core machine: 1 GB through it would take 20-60 minutes. Tokenizer
    memory does not depend on the file, so the fast one shows the scaling at a bearable cost; the
    100 MB run with the real tokenizer shows the real tokenizer's footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or has "
         "had not but also its after first new two other one their time years may into more most some "
         "city river music school world small light water house story north early later several").split()
MB = 1 << 20


def make_file(path: Path, size: int, seed: int = 0) -> dict:
    """Alpaca rows of varied length (mean ~4 KB) until `size` bytes; one row in 50 repeats an earlier one."""
    rng = random.Random(seed)
    written, rows, dups = 0, 0, 0
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            if recent and rng.random() < 0.02:
                line = rng.choice(recent)
                dups += 1
            else:
                q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 1100)))
                a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300)))
                line = json.dumps({"instruction": f"Question {rows}: {q}", "input": "", "output": a}) + "\n"
                if len(recent) < 1000:
                    recent.append(line)
            f.write(line)
            written += len(line.encode("utf-8"))
            rows += 1
    return {"bytes": written, "rows": rows, "duplicates_written": dups}


def fast_model(folder: Path) -> Path:
    """A model folder holding only a config and a word-level tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)) + ["system", "user", "assistant"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=specials[1:])
    tok.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(folder)
    return folder


def run_check(data: Path, model: str, workdir: Path) -> dict:
    config = workdir / f"config-{os.getpid()}.json"
    config.write_text(json.dumps({"model": {"name_or_path": model}, "data": {"max_length": 1024},
                                  "output": {"logs_dir": str(workdir / "logs")}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.time()
    with open(workdir / "out.json", "wb") as out, open(workdir / "err.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llm_finetune", "data", "check", str(data), "--config",
                                 str(config), "--json", "--no-plot"], stdout=out, stderr=err, env=env, cwd=workdir)
        # wait4 reaps this child and returns its own resource usage (peak RSS of this run only).
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"data check failed ({code}):\n{(workdir / 'err.txt').read_text()[-3000:]}")
    report = json.loads((workdir / "out.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "report": report}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="1 MB and 10 MB instead of 100 MB and 1 GB")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_check_memory.md"))
    args = p.parse_args()
    small, large = (1 * MB, 10 * MB) if args.quick else (100 * MB, 1024 * MB)
    tmp = Path(tempfile.mkdtemp(prefix="data_check_bench-", dir="/tmp"))
    rows = []
    try:
        fast = str(fast_model(tmp / "fast_model"))
        plan = [("tiny (1 MB)", MB, "default"), (f"{small // MB} MB", small, "default"),
                ("tiny (1 MB)", MB, fast), (f"{small // MB} MB", small, fast), (f"{large // MB} MB", large, fast)]
        files: dict[int, tuple[Path, dict]] = {}
        for label, size, model in plan:
            if size not in files:
                path = tmp / f"data_{size // MB}MB.jsonl"
                files[size] = (path, make_file(path, size))
            path, made = files[size]
            print(f"data check {label} with {'SmolLM2 tokenizer' if model == 'default' else 'word-level tokenizer'}"
                  " ...", flush=True)
            measured = run_check(path, model, tmp)
            r = measured["report"]
            rows.append({"file": label, "bytes": made["bytes"], "rows": made["rows"],
                         "tokenizer": "SmolLM2 (real)" if model == "default" else "word-level (fast)",
                         "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"],
                         "duplicates": r["duplicates"], "duplicates_written": made["duplicates_written"],
                         "tokens": r["tokens"], "too_long": r["too_long"]})
            print(f"  {rows[-1]}", flush=True)
            write_results(Path(args.out), rows)  # after every run, so a stopped benchmark keeps what it measured
            if size == large:
                files.pop(size)[0].unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_results(path: Path, rows: list[dict]) -> None:
    import platform

    lines = [
        "# `llm-finetune data check`: peak memory vs file size",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/data_check_memory.py` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}. The machine is "
        "shared: other engineers' test runs used the same 2 cores, so wall times are pessimistic and noisy; "
        "peak memory is not affected.",
        "",
        "Each row is one fresh `data check FILE --json --no-plot` subprocess (max_length 1024); peak RSS is that "
        "child's `ru_maxrss` (os.wait4). The files are generated alpaca JSONL (rows of 0.3-9 KB, mean ~4 KB; "
        "one row in 50 repeats an earlier one) and deleted afterwards.",
        "",
        "| file | bytes | rows | tokenizer | wall s | MB/s | peak RSS MB | duplicates found / written | tokens min / median / p95 / max |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        t = r["tokens"]
        lines.append(f"| {r['file']} | {r['bytes']:,} | {r['rows']:,} | {r['tokenizer']} | {r['wall_s']:.0f} | "
                     f"{r['bytes'] / MB / r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['duplicates']:,} / {r['duplicates_written']:,} | "
                     f"{t['min']} / {t['median']} / {t['p95']} / {t['max']} |")
    lines += [
        "",
        "Reading it: the 1 MB rows are the fixed cost (Python, transformers, the tokenizer). The growth from the "
        "1 MB run to the largest run is the per-row state: an 8-byte hash per example (`array('Q')`, sorted with "
        "numpy at the end to count duplicates) and one counter per distinct token length. Nothing keeps rows, "
        "texts or token ids after their 256-example chunk is measured.",
        "",
        "Why two tokenizers: the real SmolLM2 byte-level BPE path runs at 0.3-0.8 MB/s here, so 1 GB through it "
        "would take 20-60 minutes on the shared cores. The word-level tokenizer (built by the script, ChatML "
        "template, same code path: template rendering, offsets, label masks) makes the 1 GB run affordable; "
        "tokenizer memory does not depend on the file size, and the 100 MB row with the real tokenizer shows "
        "its footprint.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"written {path}")


if __name__ == "__main__":
    main()

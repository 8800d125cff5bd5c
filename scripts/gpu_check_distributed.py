"""Sharded training on a machine with 2+ CUDA GPUs: the shipped accelerate configs train, and the saved
adapter (or model) is whole. Run from the repository root:

    python scripts/gpu_check_distributed.py            # ~5 minutes on 2 GPUs; writes nothing in the repo

For each of DDP, FSDP2 + LoRA, FSDP2 full fine-tuning, DeepSpeed ZeRO-2 and ZeRO-3 (the DeepSpeed ones when
`pip install 'llm-finetune[deepspeed]'` is done; skipped with a note otherwise), on a tiny random Llama
built offline and on the default SmolLM2-135M (FSDP2 + LoRA), through `accelerate launch --config_file
config/accelerate/<name>.yaml`:
  1. the run completes, the manifest records world_size 2 and (FSDP / ZeRO-3) a sharded save;
  2. every saved tensor has the trained weight's full shape (never empty or one process's slice);
  3. the saved folder, loaded back from disk, gives the trained model's loss on a fixed batch (verify_reload);
  4. the adapter is close to the one DDP trains with the same global batch (bf16: loose tolerance);
  5. the loss fell.
Prints one line per run and exits non-zero if any check failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("gpu_check_distributed: needs a machine with 2 or more CUDA GPUs (found "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}); nothing run", file=sys.stderr)
        return 2
    print("GPUs:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama, build_tokenizer, extraction_rows, write_jsonl
    from safetensors.torch import load_file

    root = Path(tempfile.mkdtemp(prefix="gpu-dist-check-"))
    tok = build_tokenizer(root / "tok")
    build_tiny_llama(root / "tiny", tok, hidden=64)
    write_jsonl(root / "train.jsonl", extraction_rows(64))
    write_jsonl(root / "eval.jsonl", extraction_rows(8, offset=64))
    have_deepspeed = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    failures: list[str] = []
    adapters: dict[str, dict] = {}

    def launch(name: str, config: str, model: str, method: str, *extra: str) -> None:
        sets = [f"model.name_or_path={model}", f"method.name={method}", f"data.train_file={root / 'train.jsonl'}",
                f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "train.max_steps=12",
                "train.batch_size=4", "train.logging_steps=1", "train.warmup_ratio=0", "method.dropout=0.0",
                f"output.dir={root / name / 'ck'}", f"output.logs_dir={root / name / 'logs'}",
                "eval.max_new_tokens=8", *extra]
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "config" / "accelerate" / config), "--num_processes", "2", "-m", "llm_finetune", "train",
                *[a for s in sets for a in ("--set", s)]]
        done = subprocess.run(argv, cwd=str(ROOT), env=env, capture_output=True, text=True)
        problems = []
        if done.returncode != 0:
            problems.append(f"exit {done.returncode}: {done.stderr[-1500:]}")
        else:
            manifest = json.loads((root / name / "ck" / "run_manifest.json").read_text())
            check = manifest.get("saved_check") or {}
            sharded = config.startswith(("fsdp", "zero3"))
            if manifest["processes"]["world_size"] != 2:
                problems.append(f"world_size {manifest['processes']['world_size']}")
            if sharded and not check.get("sharded"):
                problems.append("the save was not recorded as sharded")
            reload = check.get("reload")
            if sharded and not reload:
                problems.append("no reload check ran")
            losses = [json.loads(line)["loss"] for line in (root / name / "logs" / "metrics.jsonl").read_text()
                      .splitlines() if '"loss"' in line]
            if not sum(losses[-3:]) < sum(losses[:3]):
                problems.append(f"loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
            folder = root / name / "ck" / "adapter_model"
            weights = {}
            for f in folder.glob("*.safetensors"):
                weights.update(load_file(f))
            if any(t.numel() == 0 for t in weights.values()):
                problems.append("an empty tensor was saved")
            adapters[name] = weights
            print(f"{name}: {config} {method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {check.get('tensors')} "
                  f"tensors, sharded {check.get('sharded')}, reload {reload}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
            print(f"{name}: FAILED: {'; '.join(problems)}")

    launch("ddp_lora", "ddp.yaml", str(root / "tiny"), "lora", "output.verify_reload=always")
    launch("fsdp2_lora", "fsdp2_lora.yaml", str(root / "tiny"), "lora")
    launch("fsdp2_full", "fsdp2_full.yaml", str(root / "tiny"), "full")
    launch("fsdp2_lora_default", "fsdp2_lora.yaml", "default", "lora")
    if have_deepspeed:
        launch("zero2_lora", "zero2.yaml", str(root / "tiny"), "lora", "output.verify_reload=always")
        launch("zero3_lora", "zero3.yaml", str(root / "tiny"), "lora")
    else:
        print("DeepSpeed is not installed: ZeRO-2/3 skipped (pip install 'llm-finetune[deepspeed]' to run them)")

    # The sharded adapters against the DDP one, same data, same global batch (bf16 kernels differ: loose).
    import torch as t

    for name in ("fsdp2_lora", "zero2_lora", "zero3_lora"):
        if name in adapters and "ddp_lora" in adapters:
            ref, got = adapters["ddp_lora"], adapters[name]
            if ref.keys() != got.keys():
                failures.append(f"{name}: other tensor names than DDP's")
                continue
            worst = max(((got[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max().clamp(min=1e-6))
                        .item() for k in ref)
            print(f"{name} vs ddp_lora: largest relative difference {worst:.3g}")
            if not worst < 0.05 or not all(t.isfinite(v).all() for v in got.values()):
                failures.append(f"{name}: adapter differs from DDP's by {worst:.3g}")
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "all distributed checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

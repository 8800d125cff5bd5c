#!/usr/bin/env bash
# Repeat the quantised and paged paths on a CUDA GPU machine (they are tested on CPU here, and the
# paged optimizers are refused on CPU). Run from the repository root:
#
#     bash scripts/gpu_check_quantised.sh            # ~2-3 minutes on one GPU
#
# It checks, on a tiny random Llama built offline and then on the default SmolLM2-135M:
#   1. qlora (4-bit NF4 + double quantisation) trains with bf16 compute and paged_adamw_8bit, loss falls;
#   2. lora on an 8-bit base trains with paged_adamw_32bit;
#   3. the dry-run plan's weight memory is within 25% of torch.cuda.max_memory_allocated after loading;
#   4. the refusal of paged optimizers does NOT fire when CUDA is present.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
$PY - <<'PY'
import json, sys, tempfile, torch
from pathlib import Path
assert torch.cuda.is_available(), "this script needs a CUDA GPU"
print("GPU:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
sys.path.insert(0, "tests")
from conftest import build_tokenizer, build_tiny_llama, extraction_rows, write_jsonl
from llm_finetune.config import load_config
from llm_finetune.train import run
from llm_finetune.dry_run import estimate
from llm_finetune import methods

root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
tok = build_tokenizer(root / "tok")
build_tiny_llama(root / "tiny", tok, hidden=64)
write_jsonl(root / "train.jsonl", extraction_rows(32))
failures = []

def check(name, model, extra):
    cfg = load_config(None, [f"model.name_or_path={model}", f"data.train_file={root/'train.jsonl'}",
                             "data.eval_file=null", "data.max_length=128", "train.max_steps=12",
                             "train.logging_steps=1", "train.warmup_ratio=0", f"output.dir={root/name/'ck'}",
                             f"output.logs_dir={root/name/'logs'}", *extra])
    torch.cuda.reset_peak_memory_stats()
    result = run(cfg)
    losses = [json.loads(l)["loss"] for l in (root/name/"logs"/"metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    ok = sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, peak {torch.cuda.max_memory_allocated()/2**20:.0f} MiB,"
          f" quantization {result.manifest['quantization']} {'OK' if ok else 'LOSS DID NOT FALL'}")
    if not ok:
        failures.append(name)

check("qlora_paged8_tiny", root / "tiny", ["method.name=qlora", "train.optimizer=paged_adamw_8bit", "train.learning_rate=1e-2"])
check("lora8bit_paged32_tiny", root / "tiny", ["method.name=lora", "model.quantization=8bit",
                                               "train.optimizer=paged_adamw_32bit", "train.learning_rate=1e-2"])
check("qlora_default_ckpt", "default", ["method.name=qlora", "train.optimizer=paged_adamw_8bit",
                                        "train.gradient_checkpointing=true", "train.batch_size=4"])
check("qlora_default_adam8", "default", ["method.name=qlora", "train.optimizer=adamw_8bit", "train.batch_size=4"])

# The plan's weight estimate against what CUDA really allocates for a 4-bit load.
from llm_finetune.models import load_model, resolve_source
cfg = load_config(None, ["method.name=qlora"])
plan = estimate(cfg)
torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated()
model = load_model(resolve_source("default"), "auto", "4bit")
used = torch.cuda.memory_allocated() - before
ratio = used / plan.memory["weights"]
print(f"4-bit weights: planned {plan.memory['weights']/2**20:.0f} MiB, allocated {used/2**20:.0f} MiB (x{ratio:.2f})")
if not 0.75 < ratio < 1.25:
    failures.append("plan_weights")
assert not any("refused" in n for n in plan.notes), plan.notes
print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
sys.exit(1 if failures else 0)
PY

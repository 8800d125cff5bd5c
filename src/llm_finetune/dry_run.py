"""`llm-finetune train --dry-run`: what a run will cost, from config.json alone, before any weight loads.

The model is built on the `meta` device (shapes, no storage), the method is applied to it the same
way a real run does, and the parameter counts are read off. Memory follows from those counts and the
chosen quantisation; activations use the per-layer estimate of Korthikanti et al. (2022, "Reducing
Activation Recomputation in Large Transformer Models"), which is rough and labelled so. Tokens come
from the real tokenizer and data when they are at hand, else from characters / 4 (labelled).

With several processes (`--nproc N`, or run under a launcher) the plan is per process: the global batch
(batch x accumulation x processes) sets the steps, and the memory of each device is estimated for DDP (a
full replica each), FSDP (full shard) and DeepSpeed ZeRO-3 (weights, gradients and optimizer states split
N ways, one or two layers gathered at a time).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import methods
from .artifacts import RUN_MANIFEST, has_tokenizer, read_json
from .config import RunConfig
from .data.preference import prepare_preferences
from .data.prepare import prepare_data
from .data.records import load_examples
from .errors import MethodError, ModelSourceError
from .models import load_tokenizer, resolve_source, run_precision
from .trainer import epoch_steps, plan_steps

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CONFIGS = "config/model_configs"

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    model: str
    config_source: str
    method: str
    quantization: str
    dtype: str
    parameters: int
    trainable: int
    memory: dict[str, float]  # bytes
    tokens_per_epoch: int | None
    tokens_note: str
    examples: int | None
    steps: int | None
    tokens_total: int | None
    throughput: float | None = None
    throughput_source: str | None = None
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    batch: tuple[int, int, int] = (1, 1, 1)  # per-device batch, accumulation, global batch
    per_device: dict[str, float] = field(default_factory=dict)  # strategy -> bytes on each device (world_size > 1)

    @property
    def eta_seconds(self) -> float | None:
        if self.throughput and self.tokens_total:
            return self.tokens_total / self.throughput
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["eta_seconds"] = self.eta_seconds
        return d


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# The architecture, without weights


def architecture_config(cfg: RunConfig):
    """(transformers config, where it came from, tokenizer path or None). Never loads weights."""
    from transformers import AutoConfig


    name = cfg.model.name_or_path
    path = Path(name).expanduser()
    if name not in ("default", "", None) and not path.exists() and name.count("/") == 1:
        for base in (Path.cwd(), ROOT):  # a copy of a Hub model's config.json shipped for offline planning
            bundled = base / BUNDLED_CONFIGS / name / "config.json"
            if bundled.is_file():
                try:
                    source = resolve_source(name, cfg.model.gguf_file, cfg.model.revision)
                    return (AutoConfig.from_pretrained(source.load_path, trust_remote_code=cfg.model.trust_remote_code),
                            f"{name} (Hugging Face cache)", source.load_path)
                except ModelSourceError:
                    return AutoConfig.from_pretrained(bundled.parent), f"{bundled} (bundled copy of {name}'s " \
                                                                       "config.json; the Hub is not needed)", None
    source = resolve_source(name, cfg.model.gguf_file, cfg.model.revision)
    config = AutoConfig.from_pretrained(source.load_path, trust_remote_code=cfg.model.trust_remote_code)
    tok = source.load_path if has_tokenizer(source.load_path) else None
    return config, f"{source.load_path}/config.json", tok


def _meta_model(config, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)


def _quantized_linear_params(model) -> int:
    """Parameters bitsandbytes would quantise: linear layers inside the blocks (not the head)."""
    import torch

    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        kind = type(module).__name__
        if (isinstance(module, torch.nn.Linear) or kind == "Conv1D") and module is not head:
            total += module.weight.numel()
    return total


def _hidden_layers_vocab(config) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    return hidden, layers, text.vocab_size


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate(cfg: RunConfig, throughput: float | None = None, world_size: int | None = None) -> Plan:
    import torch

    from .distributed import processes

    world = world_size or processes().world_size

    config, config_source, tok_path = architecture_config(cfg)
    quant = methods.effective_quantization(cfg.method.name, cfg.model.quantization)
    precision = run_precision(cfg)
    dtype = precision.load  # as the run would load it (fp32 where weights train in full)
    dtype_name = str(dtype).replace("torch.", "")
    wbytes = DTYPE_BYTES[dtype_name]
    notes: list[str] = []

    tokenizer = None
    if tok_path:
        tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)

    # Tokens and steps, from the real data where it is at hand.
    tokens_per_epoch = examples = steps = tokens_total = None
    tokens_note = ""
    mean_len = None
    if Path(cfg.data.train_file).is_file():
        data_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_file=None))
        if tokenizer is not None and cfg.train.objective != "sft":  # preference rows: both answers are computed
            pref = prepare_preferences(data_cfg, tokenizer)
            if cfg.data.max_train_examples:
                pref.rows = pref.rows[: cfg.data.max_train_examples]
            encode = pref.encoder.encode
            tokens_per_epoch = sum(len(encode(e).input_ids) for r in pref.rows for e in (r.chosen, r.rejected) if e)
            examples = len(pref.rows)
            steps = cfg.train.max_steps or epoch_steps(cfg, examples, world)
            tokens_note = f"train.objective={cfg.train.objective}: every answer with its prompt"
        elif tokenizer is not None:
            data = prepare_data(data_cfg, tokenizer)
            tokens_per_epoch, examples = data.train_stats.tokens, len(data.train)
            steps = plan_steps(cfg, data, world)
            tokens_note = f"{data.train_stats.trained_tokens:,} of them trained (assistant tokens)"
        else:
            rows = load_examples(cfg.data.train_file, cfg.data.format, roles=cfg.data.roles).examples
            if cfg.data.max_train_examples:
                rows = rows[: cfg.data.max_train_examples]
            chars = sum(len(m["content"]) + 16 for ex in rows for m in ex.messages)
            tokens_per_epoch = min(chars // 4, len(rows) * cfg.data.max_length)
            examples = len(rows)
            tokens_note = "approximate: no tokenizer offline, ~4 characters per token"
            steps = cfg.train.max_steps or epoch_steps(cfg, examples, world)
        mean_len = tokens_per_epoch / max(examples, 1)
        tokens_total = int(round(steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world
                                 * mean_len))
    else:
        notes.append(f"data.train_file {cfg.data.train_file} not found: no token count or ETA")

    # Parameters: the method applied to a weightless model.
    model = _meta_model(config, cfg.model.trust_remote_code)
    total_base = sum(p.numel() for p in model.parameters())
    quantized = _quantized_linear_params(model) if quant != "none" else 0
    method_cfg = copy.deepcopy(cfg.method)
    if method_cfg.name == "prompt_tuning" and method_cfg.prompt_init_text:
        if tokenizer is not None:
            method_cfg.num_virtual_tokens = method_cfg.num_virtual_tokens or len(
                tokenizer(method_cfg.prompt_init_text, add_special_tokens=False)["input_ids"])
        method_cfg.prompt_init_text = None  # same parameter count, no embedding lookup needed
    method_cfg.init_adapter = None  # counted as a fresh adapter of the same shape
    with torch.device("meta"):
        wrapped = methods.apply_method(model, method_cfg, total_steps=max(steps or 100, 10))
    trainable, _ = methods.count_parameters(wrapped)
    adapter = 0 if cfg.method.name == "full" else trainable

    # Memory, in bytes.
    if quant == "4bit":
        # NF4: 4 bits a weight, plus one 8-bit absmax per 64 weights and fp32 constants per 256 blocks
        # (double quantisation).
        base_weights = quantized * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total_base - quantized) * wbytes
    elif quant == "8bit":
        base_weights = quantized * 1.0 + (total_base - quantized) * wbytes
    else:
        base_weights = total_base * wbytes
    adapter_bytes = adapter * 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype)
    grad_bytes = trainable * (wbytes if cfg.method.name == "full" else 4)
    optim_bytes = trainable * methods.OPTIMIZERS[cfg.train.optimizer].state_bytes
    hidden, layers, vocab = _hidden_layers_vocab(config)
    seq = cfg.data.max_length  # a batch holding one longest example pads every row to it
    tokens_in_batch = cfg.train.batch_size * seq
    # The estimate is for 16-bit activations; a half base keeping fp32 activations (keep_activations_fp32) counts 4.
    act_scale = DTYPE_BYTES[precision.activations_name] / 2
    per_layer_full = 34 * tokens_in_batch * hidden * act_scale  # attention scores excluded (SDPA kernels)
    if cfg.train.gradient_checkpointing:
        activations = layers * 2 * tokens_in_batch * hidden * act_scale + per_layer_full
    else:
        activations = layers * per_layer_full
    logits = tokens_in_batch * vocab * (wbytes + 4)  # logits, plus fp32 for the loss
    memory = {"weights": base_weights, "adapter": adapter_bytes, "gradients": grad_bytes,
              "optimizer_states": optim_bytes, "activations": activations + logits}
    memory["total"] = sum(memory.values())
    notes.append(f"activations for batch {cfg.train.batch_size} x {seq} tokens"
                 f"{' with gradient checkpointing' if cfg.train.gradient_checkpointing else ''}; a rough estimate "
                 "(Korthikanti et al. 2022, 34·s·b·h bytes per layer at 16 bit), plus the logits; the framework and "
                 "CUDA context add ~0.5-1 GiB on a GPU")

    per_device = _per_device(memory, world, layers, trainable, wbytes, cfg.method.name == "full") \
        if world > 1 else {}
    if per_device and quant != "none":
        notes.append("FSDP / ZeRO-3 with a quantised base: bitsandbytes 4-bit shards only with "
                     "bnb_4bit_quant_storage set to the compute dtype; 8-bit weights are not sharded")

    try:
        for note in methods.preflight(cfg):
            notes.append(note)
    except MethodError as e:
        notes.append(f"on this machine the run would be refused: {e}")

    # Throughput: given, else measured by an earlier run of the same model and method.
    source = "--throughput" if throughput else None
    if not throughput:
        manifest = Path(cfg.output.dir) / RUN_MANIFEST
        m = read_json(manifest)
        if m:
            t = m.get("training", {})
            if m.get("method") == cfg.method.name and t.get("tokens_seen") and t.get("train_runtime_s"):
                throughput = t["tokens_seen"] / t["train_runtime_s"]
                source = f"measured by the previous run in {manifest}"
    return Plan(model=cfg.model.name_or_path, config_source=config_source, method=cfg.method.name,
                quantization=quant, dtype=dtype_name, parameters=total_base, trainable=trainable, memory=memory,
                tokens_per_epoch=tokens_per_epoch, tokens_note=tokens_note, examples=examples, steps=steps,
                tokens_total=tokens_total, throughput=throughput, throughput_source=source, notes=notes,
                world_size=world, batch=(cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                                         cfg.train.batch_size * cfg.train.gradient_accumulation_steps * world),
                per_device=per_device)


def _per_device(memory: dict[str, float], world: int, layers: int, trainable: int, wbytes: int,
                full: bool) -> dict[str, float]:
    """Bytes on each of `world` devices. DDP: a whole replica, plus its gradient buckets (a copy of the
    trainable gradients). FSDP (full shard): weights, gradients and optimizer states split N ways, plus two
    decoder layers gathered at a time (the one computing, the one prefetched). ZeRO-3: the same split, plus
    fp32 master weights of 16-bit trainable weights (full fine-tuning)."""
    state = memory["weights"] + memory["adapter"] + memory["gradients"] + memory["optimizer_states"]
    gathered = 2 * memory["weights"] / max(layers, 1)
    sharded = state / world + gathered + memory["activations"]
    master = trainable * 4 / world if full and wbytes < 4 else 0.0
    return {"DDP": memory["total"] + memory["gradients"], "FSDP (full shard)": sharded, "DeepSpeed ZeRO-3": sharded
            + master}


def format_plan(p: Plan) -> str:
    m = p.memory
    lines = [
        f"Dry run: nothing loaded, nothing written. Architecture from {p.config_source}",
        f"  model            {p.model}",
        f"  method           {p.method}   base weights {p.quantization if p.quantization != 'none' else p.dtype}",
        f"  parameters       {_count(p.parameters)} in the base model, {_count(p.trainable)} trainable "
        f"({100 * p.trainable / max(p.parameters, 1):.3f}% of the base)",
        "  memory estimate",
        f"    weights          {_gib(m['weights'])}",
        f"    adapter          {_gib(m['adapter'])}",
        f"    gradients        {_gib(m['gradients'])}",
        f"    optimizer states {_gib(m['optimizer_states'])}",
        f"    activations      {_gib(m['activations'])}  (rough)",
        f"    total            {_gib(m['total'])}",
    ]
    if p.world_size > 1:
        lines.append(f"  processes        {p.world_size}: batch {p.batch[0]} per process x {p.batch[1]} accumulation x "
                     f"{p.world_size} processes = {p.batch[2]} examples per optimizer step")
        lines.append("  memory per device (rough, activations included)")
        lines += [f"    {name:<20} {_gib(b)}" for name, b in p.per_device.items()]
    if p.tokens_per_epoch is not None:
        lines.append(f"  data             {p.examples} examples, {p.tokens_per_epoch:,} tokens per epoch"
                     f"{f' ({p.tokens_note})' if p.tokens_note else ''}")
        lines.append(f"  run              {p.steps} optimizer steps, ~{p.tokens_total:,} tokens")
    if p.eta_seconds is not None:
        lines.append(f"  ETA              {p.eta_seconds / 60:.1f} min at {p.throughput:,.0f} tokens/s "
                     f"({p.throughput_source})")
    else:
        lines.append("  ETA              unknown: pass --throughput TOKENS_PER_S (e.g. from a short run)")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)

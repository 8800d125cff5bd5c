"""Method name -> PEFT config, plus quantisation of the frozen base, refusal rules and merge rules.

One plain dict (`BUILDERS`) maps each method to the function that builds its PEFT config (`full`
builds none: every weight trains). Each method has its own default learning rate, because prompt
tuning, LoRA and full fine-tuning differ by orders of magnitude, so switching the method alone
trains well. `preflight` runs before any weights are loaded and refuses, with the reason and an
alternative, whatever cannot run on this machine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import MethodConfig

log = logging.getLogger("llm_finetune")

LORA_FAMILY = ("lora", "qlora", "dora", "rslora")
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
METHODS = (*LORA_FAMILY, "adalora", "ia3", *PROMPT_METHODS, "full")

# Peak learning rates that train well when only the method is switched (AdamW, cosine schedule).
# They follow the usual orders of magnitude (the papers use 3e-3 for IA3, ~1e-2..3e-1 for prompt
# tuning, 1e-4..1e-3 for the LoRA family, 1e-5..5e-5 for full fine-tuning), and were checked, not
# swept, on SmolLM2-135M: benchmarks/methods_benchmark.py runs 20 steps of each at its default and
# records the loss before and after (benchmarks/results/methods.md). The LoRA family's (with the
# config's r=16, alpha=32, dropout 0.05) was chosen by benchmarks/defaults_sweep.py on three tasks
# with shifted held-out sets (benchmarks/results/defaults_sweep.md); rslora keeps its own (not swept).
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 5e-4,
    "qlora": 5e-4,
    "dora": 5e-4,
    "rslora": 5e-4,  # alpha/sqrt(r) = 8 at r=16: the step the old LoRA default (alpha/r = 4, 1e-3) took
    "adalora": 2e-3,
    "ia3": 3e-3,
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
    "p_tuning": 1e-2,
    "full": 2e-5,
}

# Can the trained adapter be folded into the base weights (merge_and_unload)?
MERGEABLE: dict[str, bool] = {
    **{m: True for m in LORA_FAMILY}, "adalora": True, "ia3": True,
    **{m: False for m in PROMPT_METHODS},
    "full": False,  # nothing to merge: the output already is a complete model
}

MERGE_NOTES: dict[str, str] = {
    **{m: "merges: the low-rank update is added into each adapted weight" for m in LORA_FAMILY},
    "adalora": "merges: the pruned SVD-form update is added into each adapted weight",
    "ia3": "merges: the learned scaling vectors multiply into the adapted weights",
    **{m: "cannot be merged: the learned virtual tokens are extra inputs, not a change of any weight; "
          "load the adapter with PEFT at inference" for m in PROMPT_METHODS},
    "full": "needs no merge: the output folder already is a complete model",
}

PEFT_TYPES = {"LORA": LORA_FAMILY, "ADALORA": ("adalora",), "IA3": ("ia3",), "PROMPT_TUNING": ("prompt_tuning",),
              "PREFIX_TUNING": ("prefix_tuning",), "P_TUNING": ("p_tuning",)}

DEFAULT_VIRTUAL_TOKENS = 20

OPTIMIZERS = {  # train.optimizer -> TrainingArguments.optim
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}


class MethodError(ValueError):
    """A method cannot be built or run as configured; the message says why and what to use instead."""


def merge_supported(method: str) -> bool:
    return MERGEABLE[method]


def default_learning_rate(name: str) -> float:
    return DEFAULT_LEARNING_RATES[name]


# ---------------------------------------------------------------------------------------------
# Before loading anything: what the machine can run


def effective_quantization(method: str, quantization: str) -> str:
    """qlora is lora on a 4-bit base; every other method loads the base as model.quantization says."""
    if method == "qlora":
        if quantization == "8bit":
            raise MethodError("method.name=qlora means a 4-bit NF4 base, but model.quantization is '8bit'. "
                              "Use method.name=lora with model.quantization=8bit, or drop model.quantization.")
        return "4bit"
    if method == "full" and quantization != "none":
        raise MethodError(f"method.name=full trains every weight, and quantised ({quantization}) weights cannot be "
                          "trained. Use model.quantization=none, or an adapter method (qlora, lora, dora, ...) "
                          "on the quantised base.")
    return quantization


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantise on this machine, or None when it can (a real 4-bit round trip)."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        w = torch.randn(64, 64, device=device)
        q, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
        bnb.functional.dequantize_4bit(q, state)
    except Exception as e:  # a missing native backend shows up as any of several error types
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} has no working backend for {device} ({e})"
    return None


def preflight(cfg) -> list[str]:
    """Refuse, before any weights are loaded, what this machine or this method cannot do. Returns notes."""
    import torch

    m, notes = cfg.method, []
    quant = effective_quantization(m.name, cfg.model.quantization)
    cuda = torch.cuda.is_available()
    if quant != "none":
        problem = bitsandbytes_problem()
        if problem:
            raise MethodError(f"{'method.name=qlora' if m.name == 'qlora' else f'model.quantization={quant}'} needs "
                              f"bitsandbytes: {problem}. Use model.quantization=none with method.name=lora (or "
                              "any adapter method) instead, or run on a machine where bitsandbytes works.")
        if not cuda:
            notes.append(f"{quant} base on CPU: bitsandbytes' CPU kernels work but are slow; fine for small models")
    optim = cfg.train.optimizer
    if optim.startswith("paged_") and not cuda:
        raise MethodError(f"train.optimizer={optim}: paged optimizers move optimizer state between GPU and CPU "
                          "memory and need CUDA; this machine has no GPU. Use train.optimizer=adamw_8bit "
                          "(8-bit states, works on CPU) or adamw.")
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        problem = bitsandbytes_problem()
        if problem:
            raise MethodError(f"train.optimizer={optim} needs bitsandbytes: {problem}. Use train.optimizer=adamw.")
    if m.init_adapter:
        check_init_adapter(m.init_adapter, m.name)
    return notes


def check_init_adapter(path: str, method: str) -> None:
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise MethodError(f"method.init_adapter: {path} is not an adapter folder (no adapter_config.json).")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if method not in PEFT_TYPES.get(peft_type, ()):
        raise MethodError(f"method.init_adapter: {path} holds a {peft_type} adapter, which method.name={method!r} "
                          f"cannot continue; use method.name={PEFT_TYPES.get(peft_type, ('?',))[0]!r}.")


def quantization_config(mode: str, skip_modules: list[str] | None = None):
    """BitsAndBytesConfig for a 4-bit (NF4, double quantisation) or 8-bit base.

    `skip_modules`: modules left unquantised (None = transformers' defaults: the output head);
    `models.quantization_skips` computes them for this machine's kernels."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError(f"model.quantization={mode!r} needs bitsandbytes: pip install bitsandbytes") from None
    import torch

    from .models import pick_dtype

    if mode == "4bit":
        # NF4 with double quantisation: the QLoRA recipe. Compute in the training dtype.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=pick_dtype("auto") if torch.cuda.is_available()
                                  else torch.float32, llm_int8_skip_modules=skip_modules)
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    raise MethodError(f"model.quantization: unknown mode {mode!r}")


# ---------------------------------------------------------------------------------------------
# Targets and tied embeddings


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear-like layer, for error messages and target resolution."""
    import torch

    names = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, target_modules: list[str] | str) -> None:
    if target_modules == "all-linear" or isinstance(target_modules, str):
        return
    available = linear_module_names(model)
    all_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in all_names]
    if missing:
        raise MethodError(
            f"method.target_modules: {missing} match no module of this model. Linear layers it has: "
            f"{', '.join(available)} (or use \"all-linear\")."
        )


def tied_module_names(model) -> set[str]:
    """Leaf names of the input embedding and output head when they share one weight, else empty."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return set()
    found = set()
    for name, module in model.named_modules():
        if module is head or module is emb:
            found.add(name.rsplit(".", 1)[-1])
    return found


def _tied_modules_to_save(model, cfg: MethodConfig) -> bool:
    """Check how a tied embedding/head is trained; True when PEFT must keep the copies tied."""
    tied = tied_module_names(model)
    if not tied:
        return False
    targets = cfg.target_modules if isinstance(cfg.target_modules, list) else []
    if cfg.name != "full" and set(targets) & tied:
        raise MethodError(
            f"method.target_modules names {sorted(set(targets) & tied)}, but this model's output head shares its "
            "weight with the input embeddings. A low-rank adapter on one of them unties the pair on merge (PEFT "
            "adds the update to the shared matrix twice). Put the module in method.modules_to_save instead "
            "(trained in full, kept tied), or leave it out.")
    saved = {s.rsplit(".", 1)[-1] for s in cfg.modules_to_save}
    if not saved & tied:
        return False
    if cfg.name not in (*LORA_FAMILY, "adalora"):
        raise MethodError(
            f"method.modules_to_save names {sorted(saved & tied)}, which is tied to "
            f"{sorted(tied - saved) or 'itself'}; only the LoRA family (lora, qlora, dora, rslora, adalora) keeps "
            "tied copies tied in PEFT. Use one of those, or drop it from modules_to_save.")
    log.info("modules_to_save %s: the head is tied to the input embeddings; PEFT keeps the trained copies tied "
             "(ensure_weight_tying), so the adapter stores the full %s matrix", sorted(saved & tied),
             "x".join(map(str, model.get_input_embeddings().weight.shape)))
    return True


# ---------------------------------------------------------------------------------------------
# Builders: one per method


@dataclass
class BuildContext:
    """What a builder may need beyond the method section: the model, the run length, the tokenizer."""

    model: Any
    total_steps: int | None = None
    tokenizer: Any = None
    tokenizer_path: str | None = None


def lora_config(cfg: MethodConfig, ctx: BuildContext | None = None):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        bias="none",
        use_dora=cfg.name == "dora",
        use_rslora=cfg.name == "rslora",
        ensure_weight_tying=bool(ctx and _tied_modules_to_save(ctx.model, cfg)),
    )


def adalora_config(cfg: MethodConfig, ctx: BuildContext):
    from peft import AdaLoraConfig, TaskType

    steps = ctx.total_steps
    if not steps:
        raise MethodError("adalora needs the run's number of training steps for its rank schedule.")
    tinit = int(steps * (cfg.adalora_tinit_ratio if cfg.adalora_tinit_ratio is not None else 0.1))
    tfinal = int(steps * (cfg.adalora_tfinal_ratio if cfg.adalora_tfinal_ratio is not None else 0.2))
    if steps - tinit - tfinal < 1:
        raise MethodError(f"adalora: {steps} training steps leave no step for pruning ranks (tinit {tinit}, "
                          f"tfinal {tfinal}); lower method.adalora_tinit_ratio / adalora_tfinal_ratio or train "
                          "longer.")
    return AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        init_r=cfg.adalora_init_r or 12,
        target_r=cfg.adalora_target_r or 4,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        total_step=steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=1,
        orth_reg_weight=cfg.adalora_orth_reg_weight if cfg.adalora_orth_reg_weight is not None else 0.5,
        ensure_weight_tying=_tied_modules_to_save(ctx.model, cfg),
    )


def ia3_config(cfg: MethodConfig, ctx: BuildContext):
    from peft import IA3Config, TaskType
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    _tied_modules_to_save(ctx.model, cfg)
    model_type = ctx.model.config.model_type
    target, ff = cfg.target_modules, cfg.ia3_feedforward_modules
    if target == "all-linear" and model_type in TARGETS and ff is None:
        # IA3's own recipe (keys, values and the feed-forward output) rather than every linear layer.
        target, ff = TARGETS[model_type], FF[model_type]
    if ff and isinstance(target, list) and not set(ff) <= set(target):
        raise MethodError(f"method.ia3_feedforward_modules {ff} must be a subset of method.target_modules {target}.")
    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=target, feedforward_modules=ff or [],
                     modules_to_save=cfg.modules_to_save or None)


def prompt_tuning_config(cfg: MethodConfig, ctx: BuildContext):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    n = cfg.num_virtual_tokens
    if cfg.prompt_init_text:
        text_tokens = len(ctx.tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"])
        n = n or text_tokens  # default: exactly the text, so the initial prompt is that text
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                  prompt_tuning_init=PromptTuningInit.TEXT,
                                  prompt_tuning_init_text=cfg.prompt_init_text,
                                  tokenizer_name_or_path=ctx.tokenizer_path,
                                  modules_to_save=cfg.modules_to_save or None)
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n or DEFAULT_VIRTUAL_TOKENS,
                              prompt_tuning_init=PromptTuningInit.RANDOM, modules_to_save=cfg.modules_to_save or None)


def _kv_heads(config) -> int | None:
    """Key/value heads where PEFT's prefix sizing would assume one per query head (Falcon's multi-query)."""
    if config.model_type == "falcon" and not getattr(config, "new_decoder_architecture", False):
        return 1 if getattr(config, "multi_query", False) else None
    return None


def prefix_tuning_config(cfg: MethodConfig, ctx: BuildContext):
    from peft import PrefixTuningConfig, TaskType

    kw = {}
    kv = _kv_heads(ctx.model.config)
    if kv:
        # Falcon-7B-style multi-query attention keeps one key/value head: the prefix must match it.
        head_dim = ctx.model.config.hidden_size // ctx.model.config.num_attention_heads
        kw = {"num_attention_heads": kv, "token_dim": head_dim * kv}
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens or
                              DEFAULT_VIRTUAL_TOKENS, modules_to_save=cfg.modules_to_save or None, **kw)


def p_tuning_config(cfg: MethodConfig, ctx: BuildContext):
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens or
                               DEFAULT_VIRTUAL_TOKENS, encoder_hidden_size=cfg.encoder_hidden_size or
                               ctx.model.config.hidden_size, modules_to_save=cfg.modules_to_save or None)


BUILDERS: dict[str, Callable[[MethodConfig, BuildContext], Any] | None] = {
    "lora": lora_config,
    "qlora": lora_config,  # the 4-bit base comes from effective_quantization
    "dora": lora_config,
    "rslora": lora_config,
    "adalora": adalora_config,
    "ia3": ia3_config,
    "prompt_tuning": prompt_tuning_config,
    "prefix_tuning": prefix_tuning_config,
    "p_tuning": p_tuning_config,
    "full": None,
}

PEFT_CONFIGS = BUILDERS  # the earlier name


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_method(model, cfg: MethodConfig, total_steps: int | None = None, tokenizer=None,
                 tokenizer_path: str | None = None, gradient_checkpointing: bool = False,
                 trainable_token_indices: list[int] | None = None) -> Any:
    """Wrap `model` for training with the configured method; return the trainable model.

    `trainable_token_indices`: embedding rows trained in full (tokens a template added). PEFT trains
    just those rows, saves them with the adapter, and keeps a tied output head consistent.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if is_quantized(model):
        # Norms in fp32, the base frozen, inputs of the first layer requiring grad (needed when
        # activations are checkpointed through frozen quantised layers).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if cfg.init_adapter:
        check_init_adapter(cfg.init_adapter, cfg.name)
        peft_model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        if cfg.name == "adalora" and total_steps:
            peft_model.peft_config["default"].total_step = total_steps
        return peft_model
    if cfg.name in (*LORA_FAMILY, "adalora", "ia3"):
        check_targets(model, cfg.target_modules)
    peft_config = BUILDERS[cfg.name](cfg, BuildContext(model, total_steps, tokenizer, tokenizer_path))
    if trainable_token_indices:
        if cfg.name not in (*LORA_FAMILY, "adalora", "ia3"):
            raise MethodError(f"method {cfg.name}: the template adds special tokens whose embedding rows must be "
                              "trained, which this method cannot do; use a LoRA-family method or a tokenizer "
                              "that already has the template's tokens")
        peft_config.trainable_token_indices = token_rows_to_train(model, list(trainable_token_indices))
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        if "target" in str(e).lower():
            raise MethodError(f"method {cfg.name}: {e} Linear layers this model has: "
                              f"{', '.join(linear_module_names(model))}.") from None
        raise


def training_callbacks(model, method: str) -> list:
    """Callbacks a method needs inside the Trainer loop (AdaLoRA's rank allocation)."""
    if method != "adalora":
        return []
    from transformers import TrainerCallback

    class AdaLoraRankAllocator(TrainerCallback):
        """update_and_allocate needs the gradients (importance = |w * grad|) and must run after the
        optimizer step and before zero_grad: Trainer's on_optimizer_step is exactly that point."""

        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraRankAllocator()]


def trainer_class(method: str, base: type) -> type:
    """The Trainer class a method trains with: `base`, or for AdaLoRA a subclass whose orthogonality
    regulariser weighs the same whatever the gradient accumulation.

    PEFT adds `orth_reg_weight * R` to the loss of every forward pass (AdaLoraModel.forward). The
    Trainer passes `num_items_in_batch` (the accumulated batch's supervised tokens) to the model,
    so each micro-batch's cross-entropy is already a share of the accumulated batch's mean and the
    Trainer does not divide by the accumulation steps: the regulariser would count once per
    micro-batch, k times with accumulation k. Each micro-batch here carries 1/k of it instead, so
    (batch 8, accumulation 1) and (batch 2, accumulation 4) give the same loss and gradients.
    """
    if method != "adalora":
        return base

    class AdaLoraTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_is_a_share = (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else
                               (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                               or self.compute_loss_func is not None)  # as Trainer.training_step decides
            micro_batches = getattr(self, "current_gradient_accumulation_steps", 1)
            if not (model.training and loss_is_a_share and micro_batches > 1):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            adalora = self.accelerator.unwrap_model(model).base_model  # AdaLoraModel, which adds the term
            config = adalora.peft_config[adalora.trainable_adapter_name]
            weight = config.orth_reg_weight
            config.orth_reg_weight = weight / micro_batches
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                config.orth_reg_weight = weight

    return AdaLoraTrainer


def _numel(p) -> int:
    # A 4-bit weight is stored packed, two values per byte; its quant_state keeps the real shape.
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()


def token_rows_to_train(model, ids: list[int]) -> list[int] | dict[str, list[int]]:
    """Rows to train in the input embedding and, when it is not tied to it, in the output head too
    (otherwise a new token could be read but never predicted)."""
    head = model.get_output_embeddings()
    if head is None or getattr(model.config, "tie_word_embeddings", False):
        return ids  # PEFT applies the same rows to the tied head
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    return {names[id(model.get_input_embeddings())]: ids, names[id(head)]: ids}


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------
# Merge rules


def peft_method_of(model) -> str:
    """The method family of a loaded model: 'full' for a plain model, else from its PEFT config."""
    config = getattr(model, "peft_config", None)
    if not config:
        return "full"
    peft_type = str(getattr(config[getattr(model, "active_adapter", "default")], "peft_type").value)
    return PEFT_TYPES[peft_type][0]


def merge_adapter(model):
    """Fold a trained adapter into its base and return a plain model; refuse what cannot merge."""
    method = peft_method_of(model)
    if method == "full":
        return model
    if not MERGEABLE[method]:
        raise MethodError(f"a {method} adapter {MERGE_NOTES[method]}.")
    base = model.get_base_model()
    was_tied = bool(tied_module_names(base))
    merged = model.merge_and_unload()
    if was_tied and not tied_module_names(merged):
        raise MethodError("merging untied the output head from the input embeddings; train the head through "
                          "method.modules_to_save (kept tied) instead.")
    return merged

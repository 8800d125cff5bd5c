"""Every fine-tuning method in one table (`METHODS`), the PEFT config each builds, quantisation of the
frozen base, what the machine can run (`preflight`), and the one merge (`merge_adapter`).

One `Method` record per name holds every fact about it: its PEFT type, the builder of its PEFT
config (`full` builds none: every weight trains), its default learning rate (prompt tuning, LoRA
and full fine-tuning differ by orders of magnitude, so switching the method alone trains well),
the `method.*` options it reads, and what merging does to it. Config validation, the trainer, the
merge, the model card and the dry run all read this table.

The module stays whole (about 500 lines): the table names the builders and rules beside it, and
splitting them would put a method's facts in two files again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .artifacts import open_adapter
from .errors import MethodError

if TYPE_CHECKING:
    from .config import MethodConfig

log = logging.getLogger("llm_finetune")

DEFAULT_VIRTUAL_TOKENS = 20

# PEFT types whose learned part is a set of virtual tokens, not a weight delta: nothing to fold in.
# By PEFT type (not our method name), so adapters made by other tools are refused too.
UNMERGEABLE_PEFT_TYPES = frozenset({"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING",
                                    "ADAPTION_PROMPT", "CPT"})

_LORA_OPTIONS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "init_adapter")
_PROMPT_OPTIONS = ("modules_to_save", "init_adapter", "num_virtual_tokens")
_ADALORA_OPTIONS = ("alpha", "dropout", "target_modules", "modules_to_save", "init_adapter", "adalora_init_r",
                    "adalora_target_r", "adalora_tinit_ratio", "adalora_tfinal_ratio", "adalora_orth_reg_weight")


@dataclass(frozen=True)
class Method:
    """Everything the package knows about one `method.name`."""

    name: str
    family: str  # "lora" | "adalora" | "ia3" | "prompt" | "full": how PEFT treats it
    peft_type: str | None  # the PeftType its adapter records; None: no adapter (full fine-tuning)
    build: Callable[..., Any] | None  # (MethodConfig, BuildContext) -> PEFT config; None for full
    # Peak learning rate that trains well when only the method is switched (AdamW, cosine schedule).
    learning_rate: float
    options: tuple[str, ...]  # the method.* keys it reads (besides name)
    merge: str  # what merging does to it, or why it cannot merge (the manifest and the card say this)
    quantization: str | None = None  # a base quantisation the method implies (qlora: 4bit)

    @property
    def mergeable(self) -> bool:
        return self.peft_type is not None and self.peft_type not in UNMERGEABLE_PEFT_TYPES

    @property
    def adapts_layers(self) -> bool:
        """Adds weights to chosen layers (target_modules; can train added token rows)."""
        return self.family in ("lora", "adalora", "ia3")

    @property
    def packs(self) -> bool:
        """Can train on padding-free packed rows: PEFT ignores position_ids for virtual-token methods
        (prompt, prefix and p-tuning prepend tokens or a cache), so examples would attend across."""
        return self.family != "prompt"

    @property
    def keeps_tied_copies(self) -> bool:
        """PEFT keeps a tied embedding/head tied when it is trained through modules_to_save."""
        return self.family in ("lora", "adalora")


# ---------------------------------------------------------------------------------------------
# Before loading anything: what the machine can run


def effective_quantization(method: str, quantization: str) -> str:
    """The base's quantisation: the one the method implies (qlora: 4bit), else model.quantization.
    (config.RunConfig.validate refuses a method with a quantisation it cannot use.)"""
    return METHODS[method].quantization or quantization


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
    if OPTIMIZERS[optim].needs_cuda and not cuda:
        raise MethodError(f"train.optimizer={optim}: paged optimizers move optimizer state between GPU and CPU "
                          "memory and need CUDA; this machine has no GPU. Use train.optimizer=adamw_8bit "
                          "(8-bit states, works on CPU) or adamw.")
    if OPTIMIZERS[optim].needs_bitsandbytes:
        problem = bitsandbytes_problem()
        if problem:
            raise MethodError(f"train.optimizer={optim} needs bitsandbytes: {problem}. Use train.optimizer=adamw.")
    if m.init_adapter:
        check_init_adapter(m.init_adapter, m.name, cfg.model.allow_pickle)
    return notes


def check_init_adapter(path: str, method: str, allow_pickle: bool = False) -> None:
    """method.init_adapter must hold an adapter of a PEFT type `method` can continue (in safetensors,
    unless model.allow_pickle)."""
    peft_type = open_adapter(path, "method.init_adapter", allow_pickle).peft_type
    if METHODS[method].peft_type != peft_type:
        others = [m.name for m in METHODS.values() if m.peft_type == peft_type]
        raise MethodError(f"method.init_adapter: {path} holds a {peft_type} adapter, which method.name={method!r} "
                          f"cannot continue; use method.name={others[0] if others else '?'!r}.")


def quantization_config(mode: str, compute_dtype, skip_modules: list[str] | None = None):
    """BitsAndBytesConfig for a 4-bit (NF4, double quantisation) or 8-bit base.

    `compute_dtype`: what 4-bit layers compute in (models.load_model passes the training dtype).
    `skip_modules`: modules left unquantised (None = transformers' defaults: the output head);
    `models.quantization_skips` computes them for this machine's kernels."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError(f"model.quantization={mode!r} needs bitsandbytes: pip install bitsandbytes") from None

    if mode == "4bit":
        # NF4 with double quantisation: the QLoRA recipe.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
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
    if not METHODS[cfg.name].keeps_tied_copies:
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
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    _tied_modules_to_save(ctx.model, cfg)
    model_type = ctx.model.config.model_type
    target, ff = cfg.target_modules, cfg.ia3_feedforward_modules
    if target == "all-linear" and model_type in TARGETS and ff is None:
        # IA3's own recipe (keys, values and the feed-forward output) rather than every linear layer.
        target, ff = TARGETS[model_type], FF[model_type]
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


_LORA_MERGE = "merges: the low-rank update is added into each adapted weight"
_PROMPT_MERGE = ("cannot be merged: the learned virtual tokens are extra inputs, not a change of any weight; "
                 "load the adapter with PEFT at inference")

# The learning rates follow the usual orders of magnitude (the papers use 3e-3 for IA3, ~1e-2..3e-1 for
# prompt tuning, 1e-4..1e-3 for the LoRA family, 1e-5..5e-5 for full fine-tuning) and were checked, not
# swept, on SmolLM2-135M: benchmarks/methods_benchmark.py runs 20 steps of each at its default
# (benchmarks/results/methods.md). The LoRA family's (with r=16, alpha=32, dropout 0) was chosen by
# benchmarks/defaults_sweep.py on three tasks (benchmarks/results/defaults_sweep.md); rslora keeps its
# own (not swept): alpha/sqrt(r) = 8 at r=16, the step the old LoRA default (alpha/r = 4, 1e-3) took.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "lora", "LORA", lora_config, 5e-4, _LORA_OPTIONS, _LORA_MERGE),
    Method("qlora", "lora", "LORA", lora_config, 5e-4, _LORA_OPTIONS, _LORA_MERGE, quantization="4bit"),
    Method("dora", "lora", "LORA", lora_config, 5e-4, _LORA_OPTIONS, _LORA_MERGE),
    Method("rslora", "lora", "LORA", lora_config, 5e-4, _LORA_OPTIONS, _LORA_MERGE),
    Method("adalora", "adalora", "ADALORA", adalora_config, 2e-3, _ADALORA_OPTIONS,
           "merges: the pruned SVD-form update is added into each adapted weight"),
    Method("ia3", "ia3", "IA3", ia3_config, 3e-3,
           ("target_modules", "modules_to_save", "init_adapter", "ia3_feedforward_modules"),
           "merges: the learned scaling vectors multiply into the adapted weights"),
    Method("prompt_tuning", "prompt", "PROMPT_TUNING", prompt_tuning_config, 3e-2,
           (*_PROMPT_OPTIONS, "prompt_init_text"), _PROMPT_MERGE),
    Method("prefix_tuning", "prompt", "PREFIX_TUNING", prefix_tuning_config, 1e-2, _PROMPT_OPTIONS, _PROMPT_MERGE),
    Method("p_tuning", "prompt", "P_TUNING", p_tuning_config, 1e-2, (*_PROMPT_OPTIONS, "encoder_hidden_size"),
           _PROMPT_MERGE),
    Method("full", "full", None, None, 2e-5, (), "needs no merge: the output folder already is a complete model"),
)}


@dataclass(frozen=True)
class Optimizer:
    """One train.optimizer choice."""

    trainer_name: str  # TrainingArguments.optim
    state_bytes: int  # optimizer state per trainable parameter (the dry run's memory estimate)
    needs_cuda: bool = False
    needs_bitsandbytes: bool = False


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer("adamw_torch", 8),
    "adamw_8bit": Optimizer("adamw_bnb_8bit", 2, needs_bitsandbytes=True),
    "paged_adamw_8bit": Optimizer("paged_adamw_8bit", 2, needs_cuda=True, needs_bitsandbytes=True),
    "paged_adamw_32bit": Optimizer("paged_adamw_32bit", 8, needs_cuda=True, needs_bitsandbytes=True),
    # factored second moment: about (rows + cols) per matrix; 1 B/param is generous
    "adafactor": Optimizer("adafactor", 1),
    "sgd": Optimizer("sgd", 0),
}


def option_readers() -> dict[str, tuple[str, ...]]:
    """method.* key -> the methods that read it (derived from METHODS; `name` is read by all)."""
    keys: dict[str, tuple[str, ...]] = {"name": tuple(METHODS)}
    for m in METHODS.values():
        for key in m.options:
            keys[key] = (*keys.get(key, ()), m.name)
    return keys


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_method(model, cfg: MethodConfig, total_steps: int | None = None, tokenizer=None,
                 tokenizer_path: str | None = None, gradient_checkpointing: bool = False,
                 trainable_token_indices: list[int] | None = None, allow_pickle: bool = False) -> Any:
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
        check_init_adapter(cfg.init_adapter, cfg.name, allow_pickle)
        peft_model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        if cfg.name == "adalora" and total_steps:
            peft_model.peft_config["default"].total_step = total_steps
        return peft_model
    method = METHODS[cfg.name]
    if method.adapts_layers:
        check_targets(model, cfg.target_modules)
    peft_config = method.build(cfg, BuildContext(model, total_steps, tokenizer, tokenizer_path))
    if trainable_token_indices:
        if not method.adapts_layers:
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
# Merge: the only call of PEFT's merge_and_unload


def merge_refusal(peft_type: str | None) -> str | None:
    """Why an adapter of this PEFT type cannot be folded into its base, or None when it can."""
    if peft_type in UNMERGEABLE_PEFT_TYPES:
        return (f"a {peft_type.lower()} adapter learns virtual tokens that are prepended at run time, not a change "
                "to the weights, so it cannot be merged into the base model or exported to GGUF. Use it with "
                "`llm-finetune generate --adapter`, or train with method.name=lora/dora to get a mergeable adapter")
    return None


def peft_type_of(model) -> str | None:
    """The active adapter's PEFT type of a loaded model; None for a plain model."""
    config = getattr(model, "peft_config", None)
    if not config:
        return None
    return str(config[getattr(model, "active_adapter", "default")].peft_type.value)


def _shares_storage(a, b) -> bool:
    return a is not None and b is not None and a.weight.data_ptr() == b.weight.data_ptr()


def merge_adapter(model):
    """Fold a loaded adapter into its base and return the plain model.

    Refuses by PEFT type (`merge_refusal`: also adapters made by other tools), and checks the tie of
    input embeddings and output head by storage, not only by the config flag: a base whose head
    shares the embedding matrix must still share it after the merge (PEFT would otherwise add a
    low-rank update to the shared matrix twice, or untie the pair)."""
    peft_type = peft_type_of(model)
    if peft_type is None:
        return model  # full fine-tuning: the model already is complete
    refusal = merge_refusal(peft_type)
    if refusal:
        raise MethodError(refusal)
    base = model.get_base_model()
    was_tied = _shares_storage(base.get_input_embeddings(), base.get_output_embeddings())
    merged = model.merge_and_unload()
    if was_tied and not _shares_storage(merged.get_input_embeddings(), merged.get_output_embeddings()):
        raise MethodError("merging untied the output head from the input embeddings (the adapter changed one of "
                          "them); train the head through method.modules_to_save (kept tied) instead, or leave "
                          "embed_tokens/lm_head out of method.target_modules")
    return merged

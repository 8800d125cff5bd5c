"""Method name -> PEFT config, plus quantisation of the frozen base.

One plain dict maps each method to the function that builds its PEFT config, and to its default
learning rate (methods differ by orders of magnitude, so switching the method alone trains well).
"""

from __future__ import annotations

from typing import Any

from .config import MethodConfig

# Peak learning rates that train well when only the method is switched.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 1e-3,
}

MERGEABLE = {"lora": True}


class MethodError(ValueError):
    """A method cannot be built or run as configured; the message says why and what to use instead."""


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


def lora_config(cfg: MethodConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        bias="none",
    )


PEFT_CONFIGS = {"lora": lora_config}


def default_learning_rate(name: str) -> float:
    return DEFAULT_LEARNING_RATES[name]


def quantization_config(mode: str):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MethodError(f"model.quantization={mode!r} needs bitsandbytes: pip install bitsandbytes") from None
    if mode == "4bit":
        import torch

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise MethodError(f"model.quantization: unknown mode {mode!r}")


def apply_method(model, cfg: MethodConfig, trainable_token_indices: list[int] | None = None) -> Any:
    """Wrap `model` for training with the configured method; return the trainable model.

    `trainable_token_indices`: embedding rows trained in full (tokens a template added). PEFT trains
    just those rows, saves them with the adapter, and keeps a tied output head consistent.
    """
    from peft import PeftModel, get_peft_model

    if cfg.init_adapter:
        return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    check_targets(model, cfg.target_modules)
    peft_config = PEFT_CONFIGS[cfg.name](cfg)
    if trainable_token_indices:
        peft_config.trainable_token_indices = token_rows_to_train(model, list(trainable_token_indices))
    return get_peft_model(model, peft_config)


def token_rows_to_train(model, ids: list[int]) -> list[int] | dict[str, list[int]]:
    """Rows to train in the input embedding and, when it is not tied to it, in the output head too
    (otherwise a new token could be read but never predicted)."""
    head = model.get_output_embeddings()
    if head is None or getattr(model.config, "tie_word_embeddings", False):
        return ids  # PEFT applies the same rows to the tied head
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    return {names[id(model.get_input_embeddings())]: ids, names[id(head)]: ids}


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

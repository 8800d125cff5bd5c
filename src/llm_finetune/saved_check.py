"""The saved adapter is the trained one: checked before a run reports success.

Users of other tools lost adapters silently when training was sharded (FSDP, DeepSpeed ZeRO-3): each
process holds a slice of every weight, and a save that does not gather them writes empty or partial
tensors (accelerate's FSDP2 + PEFT save kept one process's shard) that load without complaint. Here:
- `full_state_dict` gathers the whole weights from every process before the save (all processes call it);
- `check_shapes` compares every tensor in the saved files with the shape the model's weight has in full
  (a sharded weight knows it: a DTensor's shape, DeepSpeed's `ds_shape`), on every run;
- `check_reload` loads the saved folder from disk as `eval` and `generate` will, and compares its loss on
  a fixed batch with the trained model's (output.verify_reload: always where the save was sharded).
A failed check raises before the folder gets its name: the previous adapter and the checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import struct
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from .distributed import processes
from .errors import SaveCheckFailed
from .evaluation.score import eval_loss
from .models import load_model, resolve_source

log = logging.getLogger("llm_finetune")

# Relative difference allowed between the reloaded and the trained model's loss on the fixed batch. Same
# weights and dtypes give the same loss up to kernel order (and, sharded, FSDP's mixed-precision casts); a
# partial or empty adapter moves it far more.
RELOAD_TOLERANCE = 5e-3


def is_sharded(accelerator) -> bool:
    """Whether training holds each process's slice of the weights (FSDP, DeepSpeed ZeRO-3), not a replica."""
    if getattr(accelerator, "is_fsdp2", False) or getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The whole weights, gathered from every process (each must call it); None where training is not sharded
    (every process then holds them whole). DeepSpeed ZeRO-3 needs stage3_gather_16bit_weights_on_model_save."""
    if not is_sharded(trainer.accelerator):
        return None
    try:
        return trainer.accelerator.get_state_dict(trainer.model)
    except ValueError as e:  # DeepSpeed: gathering on save is off in its config
        raise SaveCheckFailed(f"the sharded weights cannot be gathered for the save: {e}. Set "
                              "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config (the shipped "
                              "config/accelerate/zero3.yaml does)") from None


def _full_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every weight's shape in full, by state-dict name, however it is sharded."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_shape"):  # DeepSpeed ZeRO-3: the local tensor is empty, the full shape is kept here
            shapes[name] = tuple(p.ds_shape)
    return shapes


def expected_shapes(model, save_kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors a save of `model` must hold, by their saved names, with their full shapes."""
    full = _full_shapes(model)
    if not hasattr(model, "peft_config"):
        return full
    from peft.utils import get_peft_model_state_dict

    meta = {k: torch.empty(shape, device="meta") for k, shape in full.items()}
    options = {"adapter_name": model.active_adapter,
               "save_embedding_layers": save_kwargs.get("save_embedding_layers", "auto")}
    try:
        kept = get_peft_model_state_dict(model, state_dict=meta, **options)
    except (NotImplementedError, RuntimeError):  # AdaLoRA cuts each weight to its rank pattern by indexing it,
        kept = get_peft_model_state_dict(model, **options)  # which shapes alone cannot do: the weights themselves
    return {k: tuple(v.shape) for k, v in kept.items()}


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the folder's safetensors files (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def check_shapes(folder: Path, model, save_kwargs: dict[str, Any]) -> int:
    """Every saved tensor has its weight's full shape, none is empty, none is missing (a full model may leave
    out tied weights). Returns the number of tensors checked; raises SaveCheckFailed naming what is wrong."""
    want, got = expected_shapes(model, save_kwargs), saved_shapes(folder)
    problems = [f"{k}: saved {list(got[k])}, the trained weight is {list(want[k])}" for k in sorted(got)
                if k in want and got[k] != want[k]]
    problems += [f"{k}: saved empty" for k in sorted(got) if 0 in got[k] and k not in want]
    missing = [k for k in sorted(want) if k not in got]
    if hasattr(model, "peft_config"):
        problems += [f"{k}: not saved" for k in missing]
        problems += [f"{k}: saved, but the model has no such weight" for k in sorted(got) if k not in want]
    if not got:
        problems.append("no safetensors file was written")
    if problems:
        raise SaveCheckFailed(
            f"the saved weights in {folder} are not the trained ones ({len(problems)} problem(s)): "
            + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". A sharded save (FSDP / ZeRO-3) "
            "kept only part of each weight; the previous adapter and the checkpoints are kept")
    return len(got)


def fixed_batch_loss(model, rows: list, pad_token_id: int) -> float:
    """The token-weighted loss on a fixed batch, in eval mode (every process takes part where sharded)."""
    return eval_loss(model, rows, pad_token_id, batch_size=len(rows))["loss"]


def reload_saved(folder: Path, cfg, source, dtype, quantization: str, tokenizer):
    """The saved folder loaded from disk as `eval` loads it: the base as trained (precision, quantisation) with
    the adapter on top; for full fine-tuning, the saved model itself."""
    if cfg.method.name == "full":
        model = load_model(resolve_source(str(folder)), dtype, "none", cfg.model.trust_remote_code, tokenizer=tokenizer)
    else:
        from peft import PeftModel

        base = load_model(source, dtype, quantization, cfg.model.trust_remote_code, cfg.model.revision,
                          tokenizer=tokenizer, allow_pickle=cfg.model.allow_pickle)
        model = PeftModel.from_pretrained(base, str(folder))
    if torch.cuda.is_available() and quantization == "none":  # on the device that trained (quantised: placed by load)
        model.to(f"cuda:{processes().local_rank}")
    return model


def reloader(run) -> Callable[[Path], Any]:
    """Loads a saved folder of this run (train.Setup) as `eval` does: the base as trained, the adapter on top."""
    return partial(reload_saved, cfg=run.cfg, source=run.source, dtype=run.precision,
                   quantization=run.quantization, tokenizer=run.data.encoder.tokenizer)


def model_to_evaluate(run, fitted):
    """The tuned model the main process evaluates on its own: the trained one, or, where training was sharded
    (each process holding a slice of it), the saved adapter loaded back from disk."""
    if fitted.full_weights is None:
        return fitted.model
    return reloader(run)(Path(run.cfg.output.dir) / run.cfg.output.adapter_name)


def check_reload(folder: Path, trained_loss: float, reload: Callable[[Path], Any], loss: Callable[[Any], float]
                 ) -> dict[str, float]:
    """Load the saved folder from disk (`reload`) and compare its loss on the fixed batch (`loss`) with the
    trained model's (`trained_loss`, measured on the same batch before the save)."""
    model = reload(folder)
    reloaded = loss(model)
    del model
    gap = abs(reloaded - trained_loss) / max(abs(trained_loss), 1e-8)
    result = {"trained_loss": trained_loss, "reloaded_loss": reloaded, "relative_difference": gap}
    if not gap <= RELOAD_TOLERANCE:
        raise SaveCheckFailed(
            f"the adapter saved in {folder}, loaded back from disk, gives loss {reloaded:.6g} on a fixed batch where "
            f"the trained model gives {trained_loss:.6g} (relative difference {gap:.2g}, allowed "
            f"{RELOAD_TOLERANCE:g}): the save did not keep the trained weights. The previous adapter and the "
            "checkpoints are kept; resume from the newest checkpoint")
    log.info("saved adapter reloaded from disk: loss %.6g on the fixed batch, trained model %.6g (relative "
             "difference %.2g)", reloaded, trained_loss, gap)
    return result

"""`llm-finetune merge`: adapter + base -> a full model folder that plain transformers loads.

The merged model's logits are checked against adapter-on-base (float32, so the fold itself adds
no rounding) before the folder appears, in one rename; a failed check leaves nothing behind.
The fold itself is `methods.merge_adapter`, the package's only merge.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftModel
from transformers import GenerationConfig

from ..artifacts import MERGE_RECORD, RUN_CONFIG, RUN_MANIFEST, AdapterFolder, open_adapter
from ..data.tokenize import end_of_turn_ids
from ..errors import ExportError, MethodError
from ..manifest import atomic_dir, write_json
from ..methods import merge_adapter, merge_refusal
from ..models import load_model, load_tokenizer, resolve_source
from .check import Check, compare, logits_for, prompt_ids


@dataclass
class MergeResult:
    out_dir: Path
    check: Check  # the one that decides: merged vs adapter-on-base, float32
    base: str
    tied: bool
    checks: list[Check] = field(default_factory=list)  # every check, informational ones included


def merge_in_memory(adapter: str | Path, model: str | None = None, allow_pickle: bool = False):
    """Load base + adapter in float32, record adapter-on-base logits, fold the adapter in.

    Returns (merged model, tokenizer, checks, base name, source); the first check decides. float32
    so the fold itself adds no rounding. An adapter trained on a quantised base (QLoRA) is also
    compared with the model that was trained (adapter on that quantised base): the gap is the
    quantisation's, reported for information, since the merged model is the float32 one.
    """
    return _merge_folder(open_adapter(adapter, "merge", allow_pickle), model, allow_pickle)


def _merge_folder(folder: AdapterFolder, model: str | None, allow_pickle: bool = False):
    refusal = merge_refusal(folder.peft_type)
    if refusal:  # before any weights are loaded
        raise MethodError(f"{folder.path}: {refusal}")
    adapter = str(folder.path)
    base = folder.base_model(model)
    source = resolve_source(base)
    tokenizer = load_tokenizer(folder.tokenizer_path(source.load_path))
    prompts = prompt_ids(tokenizer)
    checks = []
    quantization = folder.quantization
    trained_logits = None
    if quantization != "none":
        trained = PeftModel.from_pretrained(load_model(source, dtype="float32", quantization=quantization,
                                                       tokenizer=tokenizer, allow_pickle=allow_pickle), adapter).eval()
        trained_logits = logits_for(trained, prompts)
        del trained
    peft_model = PeftModel.from_pretrained(load_model(source, dtype="float32", tokenizer=tokenizer,
                                                      allow_pickle=allow_pickle), adapter)
    peft_model.eval()
    reference = logits_for(peft_model, prompts)
    merged = merge_adapter(peft_model)
    merged.eval()
    merged_logits = logits_for(merged, prompts)
    checks.append(compare("merged vs adapter-on-base", reference, merged_logits))
    if trained_logits is not None:
        gap = compare(f"merged vs the trained model (adapter on the {quantization} base)", trained_logits,
                      merged_logits)
        gap.informational = True
        checks.append(gap)
    return merged, tokenizer, checks, base, source


def merge(adapter: str | Path, out_dir: str | Path, model: str | None = None, overwrite: bool = False,
          allow_pickle: bool = False) -> MergeResult:
    """Adapter + base -> a full model folder that plain transformers loads (no PEFT needed). Weights are
    read from safetensors only unless `allow_pickle`; the merged folder is always safetensors."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite or choose another --out")
    folder = open_adapter(adapter, "merge", allow_pickle)
    merged, tokenizer, checks, base, source = _merge_folder(folder, model, allow_pickle)
    check = checks[0]
    if not check.ok:
        raise ExportError(f"merge check failed, nothing written: {check.line()}")
    head = merged.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    eos_ids = end_of_turn_ids(tokenizer)
    gen = GenerationConfig.from_model_config(merged.config)
    if eos_ids:
        # Generation must stop at the end-of-turn token the adapter learned to write, not only at EOS.
        gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen.pad_token_id = tokenizer.pad_token_id
    merged.generation_config = gen

    with atomic_dir(out_dir, overwrite=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in (RUN_MANIFEST, "eval_report.json", RUN_CONFIG, "README.md"):
            if (Path(adapter) / name).is_file():
                shutil.copy2(Path(adapter) / name, tmp / name)
        write_json(tmp / MERGE_RECORD, {
            "adapter": str(Path(adapter).resolve()), "adapter_config": folder.config,
            "base": source.to_dict(), "check": {"max_abs_diff": check.max_abs_diff, "tolerance": check.tolerance},
            "checks": [c.to_dict() for c in checks],
            "tied_embeddings": tied, "generation_eos_token_id": eos_ids,
        })
    return MergeResult(out_dir, check, base, tied, checks)



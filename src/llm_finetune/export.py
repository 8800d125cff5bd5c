"""Turn an adapter into artifacts other tools run: a merged model folder and a GGUF file (+ Ollama Modelfile).

Every artifact is checked against the model it came from before it is put in place: the merged
folder's logits against adapter-on-base, the GGUF's logits (read back by transformers) against the
folder it was written from. Outputs appear in one rename, so a failed check leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("llm_finetune")

# PEFT methods whose learned part is a set of virtual tokens, not a weight delta: nothing to fold in.
UNMERGEABLE = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}

# Prompts the checks run on: short, mixed scripts, so tokenizer and weights are both exercised.
CHECK_PROMPTS = [
    "Extract name, age and city as JSON.\n\nAna Silva, 20, lives in Lisbon.",
    "What is the capital of France?",
    "Привет! 今天天气很好。 0123456789",
]


class ExportError(ValueError):
    """The artifact cannot be produced from this input; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Which base model an adapter belongs to


def adapter_config(adapter: str | Path) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ExportError(f"{adapter}: not an adapter folder (no adapter_config.json). Pass the folder written "
                          "by `llm-finetune train`, e.g. checkpoints/adapter_model.")
    return json.loads(path.read_text(encoding="utf-8"))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def base_model_for(adapter: str | Path, override: str | None = None) -> str:
    """The base the adapter was trained on: --model if given, else what its run manifest recorded."""
    if override:
        return override
    manifest = read_json(Path(adapter) / "run_manifest.json") or {}
    model = manifest.get("model") or {}
    if model.get("kind") == "default":
        return "default"
    if model.get("kind") == "gguf" and model.get("original"):
        return model["original"]
    if model.get("kind") == "local" and model.get("load_path"):
        return model["load_path"]
    if model.get("hub_id"):
        return model["hub_id"]
    base = adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{adapter}: cannot tell which base model it belongs to (no run_manifest.json and no "
                          "base_model_name_or_path); pass --model")
    return base


def check_mergeable(adapter: str | Path) -> dict:
    cfg = adapter_config(adapter)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type in UNMERGEABLE:
        raise ExportError(
            f"{adapter}: a {peft_type.lower()} adapter learns virtual tokens that are prepended at run time, not "
            "a change to the weights, so it cannot be merged into the base model or exported to GGUF. Use it "
            "with `llm-finetune generate --adapter`, or train with method.name=lora/dora to get a mergeable adapter."
        )
    return cfg


# ---------------------------------------------------------------------------------------------
# Logit checks


def _prompt_ids(tokenizer) -> list[list[int]]:
    from .data.tokenize import ChatEncoder

    try:
        encoder = ChatEncoder(tokenizer)
        return [encoder.encode_prompt([{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
    except ValueError:  # no usable chat template: plain text still exercises the weights
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in CHECK_PROMPTS]


def logits_for(model, prompts: list[list[int]]) -> list:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in prompts:
            t = torch.as_tensor([ids], device=device)
            out.append(model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0].float().cpu())
    return out


def max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@dataclass
class Check:
    what: str
    max_abs_diff: float
    tolerance: float
    scale: float  # largest |logit| of the reference, for reading the difference
    argmax_agreement: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    clear_disagreements: int = 0  # positions whose argmax differs although the reference's top-2 gap is wide
    informational: bool = False  # reported, never a reason to refuse (e.g. the 4-bit quantisation gap)

    @property
    def ok(self) -> bool:
        return self.informational or (self.max_abs_diff <= self.tolerance and not self.clear_disagreements)

    def line(self) -> str:
        verdict = "(for information)" if self.informational else "OK" if self.ok else "FAILED"
        relative = self.max_abs_diff / max(self.scale, 1e-12)
        bound = "" if self.informational else f"tolerance {self.tolerance:.3g}, "
        return (f"{self.what}: max |logit diff| = {self.max_abs_diff:.3g} ({relative:.2g} of the largest |logit| "
                f"{self.scale:.3g}; {bound}next-token argmax agreement {self.argmax_agreement:.1%}) {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "largest_abs_logit": self.scale, "argmax_agreement": self.argmax_agreement,
                "clear_argmax_disagreements": self.clear_disagreements, "ok": self.ok,
                "informational": self.informational}


# How far two float32 forward passes of the same function may drift apart, relative to the logit
# scale. Merging changes the order of float operations (W x + B(A x) becomes (W + BA) x), and
# which kernels run (AVX-512 vs AMX tiles, thread count) changes the accumulation order too, so the
# gap grows with the size of the logits: the main job's adapter on SmolLM2-135M measured 2.5e-4 at
# a largest |logit| of 55 on an AMX CPU (4.6e-6 relative). 1e-4 of the scale leaves a 20x margin,
# while a real merge error (a lost scaling, a skipped layer, dropout left on) moves logits by the
# adapter's own effect, orders of magnitude more. Small logits keep an absolute floor of 1e-4.
FP32_RELATIVE_TOLERANCE = 1e-4


def tolerance_for(scale: float, relative: float = FP32_RELATIVE_TOLERANCE) -> float:
    """The allowed max |logit diff| for a reference whose largest |logit| is `scale`."""
    return relative * max(1.0, scale)


def compare(what: str, ref: list, got: list, tolerance: float | None = None,
            relative: float = FP32_RELATIVE_TOLERANCE) -> Check:
    """Compare logits position by position. `tolerance` None: scale-relative (`tolerance_for`).

    Besides the largest difference, a next-token argmax that differs where the reference's top-2
    gap is wider than twice the tolerance fails the check (a near-tie may flip; a clear winner not)."""
    import torch

    scale = max(float(r.abs().max()) for r in ref)
    tol = tolerance_for(scale, relative) if tolerance is None else tolerance
    agree, clear = [], 0
    for r, g in zip(ref, got):
        same = r.argmax(-1) == g.argmax(-1)
        agree.append(same.float())
        top2 = r.topk(2, dim=-1).values
        clear += int(((top2[..., 0] - top2[..., 1]) > 2 * tol).logical_and(~same).sum())
    agreement = torch.cat(agree).mean().item()
    return Check(what, max_abs_diff(ref, got), tol, scale, agreement, clear_disagreements=clear)


# ---------------------------------------------------------------------------------------------
# Merge


@dataclass
class MergeResult:
    out_dir: Path
    check: Check  # the one that decides: merged vs adapter-on-base, float32
    base: str
    tied: bool
    checks: list[Check] = field(default_factory=list)  # every check, informational ones included


def _end_of_turn_ids(tokenizer) -> list[int]:
    from .data.tokenize import ChatEncoder

    try:
        return ChatEncoder(tokenizer).generation_eos_ids()
    except ValueError:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def trained_quantization(adapter: str | Path) -> str:
    """The quantisation of the base the adapter was trained on ('none', '4bit', '8bit'), from its manifest."""
    manifest = read_json(Path(adapter) / "run_manifest.json") or {}
    return manifest.get("quantization") or "none"


def merge_in_memory(adapter: str | Path, model: str | None = None):
    """Load base + adapter in float32, record adapter-on-base logits, fold the adapter in.

    Returns (merged model, tokenizer, checks, base name, source); the first check decides. float32
    so the fold itself adds no rounding. An adapter trained on a quantised base (QLoRA) is also
    compared with the model that was trained (adapter on that quantised base): the gap is the
    quantisation's, reported for information, since the merged model is the float32 one.
    """
    from peft import PeftModel

    from .models import load_model, load_tokenizer, resolve_source

    check_mergeable(adapter)
    base = base_model_for(adapter, model)
    source = resolve_source(base)
    tok_path = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else source.load_path
    tokenizer = load_tokenizer(tok_path)
    prompts = _prompt_ids(tokenizer)
    checks = []
    quantization = trained_quantization(adapter)
    trained_logits = None
    if quantization != "none":
        trained = PeftModel.from_pretrained(load_model(source, dtype="float32", quantization=quantization,
                                                       tokenizer=tokenizer), str(adapter)).eval()
        trained_logits = logits_for(trained, prompts)
        del trained
    peft_model = PeftModel.from_pretrained(load_model(source, dtype="float32", tokenizer=tokenizer), str(adapter))
    peft_model.eval()
    reference = logits_for(peft_model, prompts)
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged_logits = logits_for(merged, prompts)
    checks.append(compare("merged vs adapter-on-base", reference, merged_logits))
    if trained_logits is not None:
        gap = compare(f"merged vs the trained model (adapter on the {quantization} base)", trained_logits,
                      merged_logits)
        gap.informational = True
        checks.append(gap)
    return merged, tokenizer, checks, base, source


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def merge(adapter: str | Path, out_dir: str | Path, model: str | None = None, overwrite: bool = False) -> MergeResult:
    """Adapter + base -> a full model folder that plain transformers loads (no PEFT needed)."""
    from transformers import GenerationConfig

    from .manifest import atomic_dir, write_json

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite or choose another --out")
    merged, tokenizer, checks, base, source = merge_in_memory(adapter, model)
    check = checks[0]
    if not check.ok:
        raise ExportError(f"merge check failed, nothing written: {check.line()}")
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    if tied and not _tied(merged):
        raise ExportError("the base ties input and output embeddings but the merged model no longer does (the "
                          "adapter changed one of them); retrain without embed_tokens/lm_head in target_modules")

    eos_ids = _end_of_turn_ids(tokenizer)
    gen = GenerationConfig.from_model_config(merged.config)
    if eos_ids:
        # Generation must stop at the end-of-turn token the adapter learned to write, not only at EOS.
        gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen.pad_token_id = tokenizer.pad_token_id
    merged.generation_config = gen

    with atomic_dir(out_dir, overwrite=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in ("run_manifest.json", "eval_report.json", "run_config.json", "README.md"):
            if (Path(adapter) / name).is_file():
                shutil.copy2(Path(adapter) / name, tmp / name)
        write_json(tmp / "llm_finetune_merge.json", {
            "adapter": str(Path(adapter).resolve()), "adapter_config": adapter_config(adapter),
            "base": source.to_dict(), "check": {"max_abs_diff": check.max_abs_diff, "tolerance": check.tolerance},
            "checks": [c.to_dict() for c in checks],
            "tied_embeddings": tied, "generation_eos_token_id": eos_ids,
        })
    return MergeResult(out_dir, check, base, tied, checks)


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_TYPES = ("f16", "q8_0")

# general.* keys that describe a particular published model: inherited from the base model's own GGUF
# when there is one (the built-in default), otherwise there is nothing true to write.
INHERITED_GENERAL = ("general.basename", "general.size_label", "general.license", "general.languages",
                     "general.organization")


def _original_gguf(folder: Path) -> Path | None:
    """The GGUF a model folder came from, if any (the built-in default is converted from one)."""
    src = read_json(folder / "llm_finetune_source.json")
    if src and src.get("gguf"):
        return Path(src["gguf"])
    merged = read_json(folder / "llm_finetune_merge.json")
    if merged and (merged.get("base") or {}).get("original"):
        return Path(merged["base"]["original"])
    return None


def _known_ggufs(folder: Path, tokenizer) -> list[Path]:
    """GGUF files whose tokenizer settings can be reused: the folder's own origin, and the built-in default
    when this tokenizer has exactly its vocabulary (checked on the converted folder, which is fast)."""
    found = []
    original = _original_gguf(folder)
    if original and original.is_file():
        found.append(original)
    try:
        from .models import default_gguf_path, load_tokenizer, resolve_source

        default = default_gguf_path()
        if default not in found and load_tokenizer(resolve_source("default")).get_vocab() == tokenizer.get_vocab():
            found.append(default)
    except Exception:  # the default model's package is optional
        pass
    return found


@functools.lru_cache(maxsize=4)
def _read_gguf_fields_cached(path: str, mtime: float, size: int) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key, f in reader.fields.items():
        types = [gguf.GGUFValueType(t).name for t in f.types]
        out[key] = (types, f.contents())
    return out


def read_gguf_fields(path: str | Path) -> dict[str, tuple[list[str], Any]]:
    """key -> (value types, value) for every metadata key (arrays of strings decoded).

    Parsing a 49k-token vocabulary takes gguf-py seconds, so results are kept per file version."""
    st = Path(path).stat()
    return _read_gguf_fields_cached(str(path), st.st_mtime, st.st_size)


def _pre_tokenizer_name(folder: Path, tokenizer, tokens: list[str], override: str | None) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`).

    llama.cpp picks it by a hash of sample tokenisations in its converter; here it is taken from a
    GGUF whose vocabulary is exactly the same (the base model's own, or the built-in default's), else from the tokenizer.json
    pre-tokenizer when that is plain GPT-2 byte-level splitting. Anything else needs --tokenizer-pre.
    """
    if override:
        return override
    for known in _known_ggufs(folder, tokenizer):
        fields = read_gguf_fields(known)
        if "tokenizer.ggml.pre" in fields and fields.get("tokenizer.ggml.tokens", ([], None))[1] == tokens:
            return fields["tokenizer.ggml.pre"][1]
    spec = (read_json(folder / "tokenizer.json") or {}).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt2"
    raise ExportError(f"{folder}: cannot tell which llama.cpp pre-tokenizer matches this tokenizer "
                      f"(pre_tokenizer {json.dumps(spec)[:200]}); pass --tokenizer-pre NAME (for example llama-bpe, "
                      "qwen2, smollm) as llama.cpp's convert_hf_to_gguf.py would choose it")


def tokenizer_metadata(folder: Path, tokenizer, vocab_size: int, pre_override: str | None = None) -> dict[str, Any]:
    """What llama.cpp needs to tokenise like the HF tokenizer: a `gpt2` (byte-level BPE) vocabulary."""
    import gguf

    spec = read_json(folder / "tokenizer.json") or {}
    if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{folder}: only byte-level BPE tokenizers (GPT-2 style, as Llama 3 / SmolLM / Qwen use) "
                          "can be written to GGUF here; this one is "
                          f"{(spec.get('model') or {}).get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (vocab padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).merges
    if not merges:
        raise ExportError(f"{folder}/tokenizer.json has no BPE merges; llama.cpp cannot tokenise without them")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    byte_level = spec.get("pre_tokenizer") or {}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(folder, tokenizer, tokens, pre_override),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.add_space_prefix": bool(byte_level.get("add_prefix_space", False)),
    }
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id")
        if tid is not None:
            meta[f"tokenizer.ggml.{kind}_token_id"] = int(tid)
    eot = _end_of_turn_ids(tokenizer)
    if eot and eot[0] != tokenizer.eos_token_id:
        # llama.cpp stops at every end-of-generation token; the end-of-turn one must be among them.
        meta["tokenizer.ggml.eot_token_id"] = int(eot[0])
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def permute_qk(w, n_head: int, n_head_kv: int | None = None):
    """HF Llama rotates halves of each head (rotate_half); llama.cpp's llama rotates adjacent pairs.

    The same reordering llama.cpp's convert_hf_to_gguf.py applies (and transformers' GGUF reader undoes).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _size_label(n_params: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= div:
            v = n_params / div
            return f"{v:.0f}{suffix}" if v >= 10 else f"{v:.1f}{suffix}".replace(".0", "")
    return str(n_params)


@dataclass
class GgufResult:
    path: Path
    qtype: str
    check: Check | None
    tensors: int
    modelfile: Path | None
    fallback_f16: list[str] = field(default_factory=list)


def write_gguf(folder: str | Path, path: str | Path, qtype: str = "f16", name: str | None = None,
               tokenizer_pre: str | None = None, finetune: str | None = None) -> tuple[int, list[str]]:
    """Write a Llama model folder as a GGUF file; return (tensor count, tensors kept in F16 for shape)."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import load_tokenizer

    folder, path = Path(folder), Path(path)
    if qtype not in GGUF_TYPES:
        raise ExportError(f"--type {qtype}: supported GGUF types are {', '.join(GGUF_TYPES)}")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llama":
        raise ExportError(f"{folder}: GGUF export supports the llama architecture (the default model's); this "
                          f"model is {config.model_type!r}. Use llama.cpp's convert_hf_to_gguf.py on the merged folder.")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{folder}: rope scaling {rope.get('rope_type')!r} is not written by this exporter; use "
                          "llama.cpp's convert_hf_to_gguf.py on the merged folder")
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    ggml_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]

    writer = gguf.GGUFWriter(str(path), "llama")
    n_params = sum(p.numel() for p in model.parameters())
    original = _original_gguf(folder)
    inherited = {}
    if original and original.is_file():
        inherited = {k: v for k, (_, v) in read_gguf_fields(original).items() if k in INHERITED_GENERAL}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.name)
    if finetune:
        writer.add_finetune(finetune)
    writer.add_basename(inherited.get("general.basename") or folder.name)
    writer.add_size_label(inherited.get("general.size_label") or _size_label(n_params))
    if "general.license" in inherited:
        writer.add_license(inherited["general.license"])
    if "general.languages" in inherited:
        writer.add_languages(inherited["general.languages"])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    meta = tokenizer_metadata(folder, tokenizer, config.vocab_size, tokenizer_pre)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    writer.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    for kind in ("bos", "eos", "unk", "pad", "eot"):
        key = f"tokenizer.ggml.{kind}_token_id"
        if key in meta:
            getattr(writer, f"add_{kind}_token_id")(meta[key])
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(meta["tokenizer.chat_template"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    fallback = []
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if "rotary_emb" in hf_name:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{folder}: no GGUF name for tensor {hf_name}; this Llama variant is not supported")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        if data.ndim == 1:  # norms stay F32, as llama.cpp writes them
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif ggml_type == gguf.GGMLQuantizationType.Q8_0:
            try:
                q = gguf.quants.quantize(data, ggml_type)
                writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=ggml_type)
            except gguf.QuantError:
                # rows not a multiple of the 32-value block: llama.cpp keeps such tensors in F16 too
                writer.add_tensor(gguf_name, data.astype(np.float16))
                fallback.append(gguf_name)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count, fallback


# Differences expected from storing weights in the format, relative to the largest |logit|. Measured on
# the default SmolLM2-135M: f16 1.2e-3, q8_0 3.4e-2 (benchmarks/results/export.md); a wrong q/k layout on
# the tiny test model gives 5.7e-3 at f16, so f16 catches it.
GGUF_TOLERANCE = {"f16": 3e-3, "q8_0": 6e-2}


def verify_gguf(path: Path, folder: Path, qtype: str) -> Check:
    """Load the file back with transformers and compare logits and tokenisation with the source folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_tokenizer

    src_tok = load_tokenizer(str(folder))
    src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = _prompt_ids(src_tok)
    mismatched = [p for p in CHECK_PROMPTS
                  if back_tok(p, add_special_tokens=False)["input_ids"] != src_tok(p, add_special_tokens=False)["input_ids"]]
    if mismatched:
        raise ExportError(f"{path.name}: the tokenizer read back from the GGUF splits {mismatched[0]!r} differently "
                          "from the source tokenizer; nothing was written")
    ref = logits_for(src, prompts)
    return compare(f"GGUF {qtype} read back vs source", ref, logits_for(back, prompts),
                   relative=GGUF_TOLERANCE[qtype])


def export_gguf(out: str | Path, adapter: str | None = None, model: str | None = None, qtype: str = "f16",
                verify: bool = True, overwrite: bool = False, tokenizer_pre: str | None = None,
                modelfile: bool = True) -> GgufResult:
    """Merged (adapter given) or base model -> GGUF file, checked, plus an Ollama Modelfile next to it."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"--out {out}: the file name must end in .gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.tmp-", dir=out.parent))
    try:
        if adapter:
            merged_dir = work / "merged"
            merge(adapter, merged_dir, model=model)
            folder = merged_dir
            finetune = Path(adapter).name
        else:
            from .models import resolve_source

            folder = Path(resolve_source(model or "default").load_path)
            finetune = None
        tmp_file = work / out.name
        count, fallback = write_gguf(folder, tmp_file, qtype, name=out.stem, tokenizer_pre=tokenizer_pre,
                                     finetune=finetune)
        check = None
        if verify:
            check = verify_gguf(tmp_file, folder, qtype)
            if not check.ok:
                raise ExportError(f"{out.name} failed its check, nothing written: {check.line()}")
        mf_path = None
        if modelfile:
            from .models import load_tokenizer

            mf_text = ollama_modelfile(load_tokenizer(str(folder)), out.name)
            mf_path = out.parent / "Modelfile"
            (work / "Modelfile").write_text(mf_text, encoding="utf-8")
        os.replace(tmp_file, out)
        if mf_path:
            os.replace(work / "Modelfile", mf_path)
        return GgufResult(out, qtype, check, count, mf_path, fallback)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile

_MARK = {"system": "\u2063SYS\u2063", "user": "\u2063USR\u2063", "assistant": "\u2063AST\u2063"}


def _split_template(tokenizer) -> dict[str, Any]:
    """Read the jinja chat template as per-role (before, after) text around the content.

    The parts are checked by rebuilding a four-turn conversation from them and comparing it with the
    jinja rendering; a template that does not decompose this way (conditionals on content, trimming)
    is refused rather than approximated.
    """
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    sys_m = {"role": "system", "content": _MARK["system"]}
    usr_m = {"role": "user", "content": _MARK["user"]}
    ast_m = {"role": "assistant", "content": _MARK["assistant"]}
    # A template may open with the BOS token ({{ bos_token }}, as Llama 3's does): that belongs to the
    # conversation, not to the first message.
    # Only when the template really writes bos_token: SmolLM's BOS is <|im_start|>, which opens every turn.
    bos = tokenizer.bos_token or ""
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    head = bos if bos and "bos_token" in source and render([sys_m]).startswith(bos) else ""

    def render_body(msgs, gen=False):
        return render(msgs, gen)[len(head):]

    one = render_body([sys_m])
    two = render_body([sys_m, usr_m])
    three = render_body([sys_m, usr_m, ast_m])
    prompt = render_body([sys_m, usr_m], gen=True)
    if not (two.startswith(one) and three.startswith(two) and prompt.startswith(two)):
        raise ExportError("the chat template does not render turn by turn")
    header = prompt[len(two):]
    blocks = {"system": one, "user": two[len(one):], "assistant": three[len(two):]}
    parts = {}
    for role, block in blocks.items():
        before, sep, after = block.partition(_MARK[role])
        if not sep:
            raise ExportError(f"the chat template drops the {role} content")
        parts[role] = (before, after)
    # Text the template puts before a conversation that has no system message (a default system prompt).
    alone = render_body([usr_m])
    user_block = parts["user"][0] + _MARK["user"] + parts["user"][1]
    default_system = None
    if alone != user_block:
        lead = alone[: len(alone) - len(user_block)] if alone.endswith(user_block) else None
        sb, sa = parts["system"]
        if lead is None or not (lead.startswith(sb) and lead.endswith(sa)):
            raise ExportError("the chat template adds text before a conversation that is not a system message")
        default_system = lead[len(sb): len(lead) - len(sa)]
    # Check: rebuild a longer conversation from the parts.
    convo = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    rebuilt = head + "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in convo) + header
    if rebuilt != render(convo, gen=True):
        raise ExportError("the chat template does not decompose into per-role text around the content")
    return {"parts": parts, "header": header, "default_system": default_system, "head": head}


def _go_literal(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise ExportError("the chat template's text contains '{{' or '\"\"\"', which an Ollama template cannot hold")
    return text


def ollama_modelfile(tokenizer, gguf_name: str) -> str:
    """A Modelfile whose Go template renders exactly what the jinja template renders."""
    split = _split_template(tokenizer)
    p = split["parts"]
    role_branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_literal(p[role][0])}{{{{ .Content }}}}'
        f"{_go_literal(p[role][1])}"
        for i, role in enumerate(("system", "user", "assistant"))
    )
    # One line with no whitespace trimming ({{- ... -}}): the newlines in the parts are part of the format.
    head = split["head"]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if head and probe and probe[0] == tokenizer.bos_token_id:
        head = ""  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token); writing it too would double it
    template = f"{_go_literal(head)}{{{{ range .Messages }}}}{role_branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(split['header'])}"
    stops = []
    for tid in _end_of_turn_ids(tokenizer):
        tok = tokenizer.convert_ids_to_tokens(tid)
        if tok and tok not in stops:
            stops.append(tok)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if split["default_system"]:
        lines.append(f'SYSTEM """{_go_literal(split["default_system"])}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"

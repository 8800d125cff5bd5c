"""`llm-finetune export`: a merged (or base) Llama model folder -> a GGUF file, checked, plus an Ollama
Modelfile. The file is read back by transformers and its logits compared with the folder's before it
is put in place.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import original_gguf, read_json, refuse_pickle
from ..data.tokenize import end_of_turn_ids
from ..errors import ExportError
from ..manifest import atomic_file, write_text
from ..models import default_gguf_path, load_tokenizer, resolve_source
from .check import CHECK_PROMPTS, Check, compare, logits_for, prompt_ids
from .merge import merge
from .ollama import ollama_modelfile

GGUF_TYPES = ("f16", "q8_0")

# general.* keys that describe a particular published model: inherited from the base model's own GGUF
# when there is one (the built-in default), otherwise there is nothing true to write.
INHERITED_GENERAL = ("general.basename", "general.size_label", "general.license", "general.languages",
                     "general.organization")


def _known_ggufs(folder: Path, tokenizer) -> list[Path]:
    """GGUF files whose tokenizer settings can be reused: the folder's own origin, and the built-in default
    when this tokenizer has exactly its vocabulary (checked on the converted folder, which is fast)."""
    found = []
    original = original_gguf(folder)
    if original and original.is_file():
        found.append(original)
    try:
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
    eot = end_of_turn_ids(tokenizer)
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
    original = original_gguf(folder)
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

    src_tok = load_tokenizer(str(folder))
    src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = prompt_ids(src_tok)
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
                modelfile: bool = True, allow_pickle: bool = False) -> GgufResult:
    """Merged (adapter given) or base model -> GGUF file, checked, plus an Ollama Modelfile next to it."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"--out {out}: the file name must end in .gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.work-", dir=out.parent) as work:
        if adapter:
            folder = merge(adapter, Path(work) / "merged", model=model, allow_pickle=allow_pickle).out_dir
            finetune = Path(adapter).name
        else:
            folder = Path(resolve_source(model or "default").load_path)
            refuse_pickle(folder, "export --model", allow_pickle)
            finetune = None
        mf_text = ollama_modelfile(load_tokenizer(str(folder)), out.name) if modelfile else None
        check = None
        with atomic_file(out) as tmp_file:  # the .gguf appears only once written and checked
            count, fallback = write_gguf(folder, tmp_file, qtype, name=out.stem, tokenizer_pre=tokenizer_pre,
                                         finetune=finetune)
            if verify:
                check = verify_gguf(tmp_file, folder, qtype)
                if not check.ok:
                    raise ExportError(f"{out.name} failed its check, nothing written: {check.line()}")
    mf_path = None
    if mf_text is not None:
        mf_path = out.parent / "Modelfile"
        write_text(mf_path, mf_text)
    return GgufResult(out, qtype, check, count, mf_path, fallback)

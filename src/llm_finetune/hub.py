"""Share a result on the Hugging Face Hub: the adapter, the merged model or a GGUF, with a model card.

The card is written from the files the run left behind (run_manifest.json, run_config.json,
eval_report.json), so it states what was actually done. Training writes the same card into the
adapter folder and names the base by its Hub id in adapter_config.json, so an upload with the Hub's
own tools ships a card that says something and an adapter that loads anywhere (our own commands
find the local copy through run_manifest.json). The token comes from HF_TOKEN or the Hub login and
is handed to the client only; it is never printed, logged or written.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import (
    ADAPTER_CONFIG,
    PREFERENCE_REPORT,
    RUN_CONFIG,
    RUN_MANIFEST,
    is_adapter_folder,
    is_model_folder,
    read_json,
)
from .errors import HubError
from .manifest import write_text
from .methods import option_readers

# Never uploaded: trainer state that is large or private to the machine, temp files, a stale card.
EXCLUDE = (".*", "*.tmp", "checkpoint-*", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
           "training_args.bin", "README.md", "__pycache__")


@dataclass
class PushPlan:
    kind: str  # "adapter" | "merged" | "gguf"
    repo_id: str
    files: list[tuple[Path, str]]  # (local file, path in repo)
    card: str
    info: dict[str, Any] = field(default_factory=dict)

    def listing(self) -> str:
        lines = [f"{self.repo_id} ({self.kind}):"]
        for local, remote in self.files:
            lines.append(f"  {remote:<40} {local.stat().st_size:>12,d} bytes  <- {local}")
        lines.append(f"  {'README.md':<40} {len(self.card.encode()):>12,d} bytes  (generated model card)")
        return "\n".join(lines)


def _excluded(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in EXCLUDE)


def detect(artifact: Path) -> str:
    if artifact.is_file() and artifact.suffix == ".gguf":
        return "gguf"
    if artifact.is_dir() and is_adapter_folder(artifact):
        return "adapter"
    if artifact.is_dir() and is_model_folder(artifact):
        return "merged"
    raise HubError(f"{artifact}: not something to push; give an adapter folder (adapter_config.json), a merged "
                   "model folder (config.json + *.safetensors) or a .gguf file")


def select_files(artifact: Path, kind: str) -> list[tuple[Path, str]]:
    if kind == "gguf":
        files = [(artifact, artifact.name)]
        modelfile = artifact.parent / "Modelfile"
        if modelfile.is_file():
            files.append((modelfile, "Modelfile"))
        return files
    out = []
    for path in sorted(artifact.rglob("*")):
        rel = path.relative_to(artifact)
        if path.is_file() and not _excluded(rel):
            out.append((path, rel.as_posix()))
    return out


def _provenance(artifact: Path, kind: str) -> tuple[dict, dict, dict, dict]:
    """(manifest, run config, eval report, merge info) from the artifact or, for a GGUF, nothing."""
    folder = artifact if artifact.is_dir() else artifact.parent
    report = read_json(folder / "eval_report.json") or read_json(folder / PREFERENCE_REPORT) or {}
    return (read_json(folder / RUN_MANIFEST) or {}, read_json(folder / RUN_CONFIG) or {}, report,
            read_json(folder / "llm_finetune_merge.json") or {})


def _preference_table(report: dict) -> str:
    """A preference run's evaluation: accuracy on held-out pairs, the reward margin, the generated answers."""
    def cell(side: dict) -> str:
        return f"{side['preference_accuracy']:.1%} [{side['ci95'][0]:.1%}, {side['ci95'][1]:.1%}]"

    d = report["difference"]
    rows = [f"On {report['n']} held-out preference pairs (the chosen answer more likely than the rejected one):", "",
            "| metric | base | tuned | tuned - base (95% CI) |", "|---|---|---|---|",
            f"| preference accuracy | {cell(report['base'])} | {cell(report['tuned'])} | "
            f"{d['preference_accuracy']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}] |"]
    generated = report.get("generation") or {}
    if "difference" in generated:
        metric, g = generated["tuned"].get("metric"), generated["difference"]
        rows.append(f"| {metric} of generated answers | {generated['base']['score']:.1%} | "
                    f"{generated['tuned']['score']:.1%} | {g['score']:+.1%} "
                    f"[{g['ci95'][0]:+.1%}, {g['ci95'][1]:+.1%}] |")
        rows.append(f"| eval loss on the chosen answers | {generated['base']['eval_loss']:.4g} | "
                    f"{generated['tuned']['eval_loss']:.4g} | {g['eval_loss']:+.3f} |")
    margin = report["reward_margin"]
    rows += ["", f"Mean reward margin of the tuned model against its reference: {margin['mean']:+.3f} "
                 f"(beta {margin['beta']:g})."]
    return "\n".join(rows)


def _eval_table(report: dict) -> str:
    if not report or "tuned" not in report:
        return "No held-out evaluation was recorded for this run."
    if "reward_margin" in report:
        return _preference_table(report)
    metrics = [k for k in report["tuned"] if k != "n" and isinstance(report["tuned"][k], (int, float))]
    cols = [c for c in ("base", "tuned") if c in report]
    rows = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in metrics:
        vals = []
        for c in cols:
            v = report[c].get(m)
            vals.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        label = f"{m} ({report['tuned'].get('metric')})" if m == "score" else m
        rows.append(f"| {label} | " + " | ".join(vals) + " |")
    table = f"On {report['tuned'].get('n', '?')} held-out examples:\n\n" + "\n".join(rows)
    if "difference" in report:
        d = report["difference"]
        table += (f"\n\nTuned minus base: {d['score']:+.1%} (95% CI [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}], paired "
                  f"bootstrap); eval loss {d['eval_loss']:+.3f}.")
    return table


def method_options(method: dict[str, Any]) -> dict[str, Any]:
    """The options the method reads and that were set: run_config.json lists every method's keys, and
    a card full of other methods' nulls says nothing."""
    readers = option_readers()
    name = method.get("name")
    return {k: v for k, v in method.items()
            if v is not None and v != [] and (k not in readers or name in readers[k])}


def _usage_note(model: dict[str, Any], target: str) -> list[str]:
    """Where the base of the snippet above comes from, when it is not simply the Hub id in adapter_config.json."""
    kind, hub_id = model.get("kind"), model.get("hub_id")
    if kind == "default":
        return [f"# The base is {hub_id} on the Hub; this adapter was trained on its weights read from a GGUF",
                "# file (see 'Base weights' above), which are close to the Hub's weights but not identical."]
    if kind == "gguf" and hub_id:
        return [f"# The base is the GGUF file {Path(model.get('original') or '?').name} of {hub_id}: load it with",
                f'# AutoModelForCausalLM.from_pretrained("{hub_id}", gguf_file=...) and use',
                f'# PeftModel.from_pretrained(base, "{target}").']
    if kind == "gguf":
        return ["# The base was a local GGUF file: load it yourself and use",
                f'# PeftModel.from_pretrained(base, "{target}").']
    if kind == "local":
        return ["# The base was a local folder: load it yourself (AutoModelForCausalLM.from_pretrained) and use",
                f'# PeftModel.from_pretrained(base, "{target}").']
    return []


def model_card(kind: str, repo_id: str | None, artifact: Path, manifest: dict, run_config: dict, report: dict,
               merge_info: dict) -> str:
    """The card for `push` (repo_id given) or for the adapter folder itself (repo_id None)."""
    model = manifest.get("model") or merge_info.get("base") or {}
    base_id = model.get("hub_id") or model.get("load_path") or "unknown"
    method = run_config.get("method") or {}
    # Without a repository yet (the card in the adapter folder), the snippet names a placeholder.
    target = repo_id or "PATH_OR_REPO_ID"
    title = repo_id.split("/")[-1] if repo_id else f"{method.get('name', '?')} fine-tune of {Path(base_id).name}"
    data = manifest.get("data") or {}
    training = manifest.get("training") or {}
    train_cfg = run_config.get("train") or {}
    front = ["---", f"base_model: {base_id}" if model.get("hub_id") else "", "tags:", "- llm-finetune",
             f"- {method.get('name', 'fine-tuned')}"]
    front += {"adapter": ["- peft", "library_name: peft"], "merged": ["library_name: transformers"],
              "gguf": ["- gguf"]}[kind]
    front.append("---")
    lines = [line for line in front if line]
    packaging = {"adapter": "the adapter only", "gguf": "as a GGUF file",
                 "merged": "every weight" if method.get("name") == "full" else "merged into the base"}[kind]
    lines += ["", f"# {title}", "",
              f"A {method.get('name', '?')} fine-tune of **{base_id}** made with llm-finetune ({packaging}).", ""]
    if model.get("notes"):
        lines += [f"Base weights: {'; '.join(model['notes'])}", ""]
    lines += ["## Method", ""]
    lines += [f"- {k}: `{json.dumps(v)}`" for k, v in method_options(method).items()] or ["- (not recorded)"]
    lines += ["", "## Data", ""]
    train_file = data.get("train_file") or {}
    for f in data.get("train_files") or ([train_file] if train_file else []):  # a list of files: each one
        lines.append(f"- training file: `{Path(f.get('path', '?')).name}`, sha256 `{f.get('sha256')}`, "
                     f"{f.get('lines')} lines, {f.get('bytes')} bytes")
    stats = data.get("train") or {}
    if stats:
        if "rows" in stats:  # preference rows
            lines.append(f"- preference rows kept: {stats['kept']} of {stats['rows']} ({stats.get('skipped')} dropped)")
        else:
            lines.append(f"- examples kept: {stats.get('kept')} of {stats.get('examples')} ({stats.get('skipped')} "
                         f"skipped, {stats.get('truncated')} truncated); {stats.get('tokens')} tokens, "
                         f"{stats.get('trained_tokens')} trained")
    if data.get("eval_file"):
        lines.append(f"- evaluation file: `{Path(data['eval_file'].get('path', '?')).name}`, sha256 "
                     f"`{data['eval_file'].get('sha256')}`, {data.get('eval_examples')} examples")
    if data.get("tokenizer"):
        lines.append(f"- tokenizer sha256 `{data['tokenizer'].get('sha256')}`, end-of-turn "
                     f"`{data.get('template_end_of_turn')}`")
    if not train_file and not stats:
        lines.append("- (no run manifest next to this artifact)")
    lines += ["", "## Training", ""]
    for k in ("steps", "learning_rate", "seed", "tokens_seen", "final_loss", "trainable_parameters",
              "total_parameters", "train_runtime_s"):
        if k in training:
            lines.append(f"- {k}: {training[k]}")
    for k in ("objective", "batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_ratio",
              "weight_decay", "epochs", "max_steps"):
        if k in train_cfg:
            lines.append(f"- {k}: {train_cfg[k]}")
    if (manifest.get("objective") or {}).get("options"):  # a preference objective: what TRL was given
        options = manifest["objective"]["options"]
        lines.append("- preference: " + ", ".join(f"{k} {options[k]}" for k in sorted(options)
                                                  if k not in ("max_length", "remove_unused_columns")))
    if manifest.get("versions"):
        v = manifest["versions"]
        lines.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft") if v.get(k)))
    lines += ["", "## Evaluation", "", _eval_table(report), "", "## How to use it", "", "```python"]
    if not repo_id:
        lines.append("# PATH_OR_REPO_ID: this folder, or the Hub repository it was uploaded to")
    if kind == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "from transformers import AutoTokenizer", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{target}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{target}")']
        lines += _usage_note(model, target)
    elif kind == "merged":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{target}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{target}")']
    else:
        lines += ["# llama.cpp:  llama-cli -hf " + target, "# Ollama:     ollama create NAME -f Modelfile",
                  "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{target}", gguf_file="{artifact.name}")']
    lines += ["```", "", "Or with llm-finetune: `llm-finetune generate --adapter PATH \"your prompt\"`"
              if kind == "adapter" else "", ""]
    return "\n".join(lines)


def record_hub_base(folder: str | Path) -> str | None:
    """Name the base in adapter_config.json by its Hub id (from the folder's run_manifest.json).

    PEFT records the folder the base was loaded from, which for the built-in model is a cache path on
    this machine only. The local source stays in run_manifest.json, which our own commands read
    first (artifacts.AdapterFolder.base_model). Returns the id written, or None when the base has no Hub id.
    """
    folder = Path(folder)
    hub_id = ((read_json(folder / RUN_MANIFEST) or {}).get("model") or {}).get("hub_id")
    config_path = folder / ADAPTER_CONFIG
    if not hub_id or not config_path.is_file():
        return None
    config = read_json(config_path)
    if config.get("base_model_name_or_path") != hub_id:
        config["base_model_name_or_path"] = hub_id
        write_text(config_path, json.dumps(config, indent=2, sort_keys=True))  # PEFT's own layout
    return hub_id


def write_adapter_card(folder: str | Path) -> Path:
    """Write our model card as the folder's README.md (in place of PEFT's empty template).

    Built from the files in the folder, so call it again once eval_report.json is added: the card
    then carries the evaluation table. Safe to call any number of times.
    """
    folder = Path(folder)
    kind = "adapter" if is_adapter_folder(folder) else "merged"  # method.name=full: the model
    card = model_card(kind, None, folder, *_provenance(folder, kind))
    path = folder / "README.md"
    write_text(path, card)
    return path


def describe_adapter_folder(folder: str | Path) -> None:
    """What the save step adds once the weights, run_config.json and run_manifest.json are in the folder:
    the Hub id of the base in adapter_config.json, and our model card as README.md."""
    record_hub_base(folder)
    write_adapter_card(folder)


def plan_push(artifact: str | Path, repo_id: str) -> PushPlan:
    artifact = Path(artifact)
    if not artifact.exists():
        raise HubError(f"{artifact} does not exist")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--repo {repo_id!r}: give the repository as owner/name")
    kind = detect(artifact)
    files = select_files(artifact, kind)
    card = model_card(kind, repo_id, artifact, *_provenance(artifact, kind))
    return PushPlan(kind, repo_id, files, card)


def hub_token() -> str | None:
    """HF_TOKEN, else the stored Hub login; the value is only ever passed to the client."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def push(plan: PushPlan, private: bool = False, revision: str | None = None,
         message: str = "Upload with llm-finetune") -> str:
    """Create the repository if needed and upload exactly the planned files in one commit; return its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise HubError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it (or use --dry-run)")
    token = hub_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=str(local)) for local, remote in plan.files]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode("utf-8")))
        info = api.create_commit(plan.repo_id, operations=ops, commit_message=message, repo_type="model",
                                 revision=revision)
    except HubError:
        raise
    except Exception as e:  # the client's own message, with the token masked should a request echo it
        raise HubError(f"upload to {plan.repo_id} failed: {type(e).__name__}: {str(e).replace(token, 'hf_***')}") \
            from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{plan.repo_id}"

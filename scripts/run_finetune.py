#!/usr/bin/env python
"""The main training script: fine-tune the configured model and print base-vs-tuned numbers.

    python scripts/run_finetune.py --config config/lora_config.json [--set train.epochs=2]

Thin on purpose: everything lives in the package (`llm-finetune train` does the same).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the shipped job never needs the network

from llm_finetune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

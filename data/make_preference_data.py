#!/usr/bin/env python3
"""Generate the shipped preference demo: the extraction task of the SFT demo, as pairs against the base model.

Each row is alpaca-style::

    {"instruction": "... Answer with JSON only ...", "input": "<sentence>", "chosen": "{\"name\": ..., ...}",
     "rejected": "<what the base model answers instead>"}

The instruction asks for a single JSON object with the person's name, age and city, and nothing else. The chosen
answer is exactly that (the SFT demo's reference output). The rejected answer is the base model's own greedy
answer to the same prompt, kept only where it breaks the instruction: not JSON, or JSON whose keys, types or
values differ from the text (a wrong city, the age as a string, an extra key). A base answer that is the same
object in another layout is not a broken instruction and is left out. These are the answers the base model
tends to give, so the base prefers them and preference tuning has something to move. (Hand-written "wrong"
answers did not work: the base already ranked the JSON above them 99% of the time.)

Built from data/train.jsonl and data/eval.jsonl (disjoint names, ages, cities and phrasings). Greedy decoding
with the built-in default model, offline::

    HF_HUB_OFFLINE=1 .venv/bin/python data/make_preference_data.py     # ~5 minutes on 2 CPU cores

writes data/preference_train.jsonl and data/preference_eval.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

def breaks_instruction(answer: str, reference: str) -> bool:
    try:
        return json.loads(answer) != json.loads(reference)
    except ValueError:
        return True


def main() -> None:
    from llm_finetune.config import load_config
    from llm_finetune.data.records import load_examples
    from llm_finetune.data.tokenize import encoder_for
    from llm_finetune.evaluation.score import _generate_all
    from llm_finetune.generate import load_for_inference

    model, tokenizer = load_for_inference("default")
    _, encoder = encoder_for(load_config(None, []).data, tokenizer)
    for split in ("train", "eval"):
        pool = [json.loads(line) for line in (HERE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        examples = load_examples(HERE / f"{split}.jsonl").examples
        prompts = [encoder.encode_prompt(e.prompt_messages) for e in examples]
        answers = _generate_all(model, encoder, prompts, max_new_tokens=48, batch_size=16)
        pairs = [{"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
                  "rejected": answer.text.strip()} for row, answer in zip(pool, answers)
                 if answer.text.strip() and breaks_instruction(answer.text.strip(), row["output"])]
        body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        (HERE / f"preference_{split}.jsonl").write_text(body, encoding="utf-8")
        print(f"data/preference_{split}.jsonl: {len(pairs)} pairs (of {len(pool)} prompts)")


if __name__ == "__main__":
    main()

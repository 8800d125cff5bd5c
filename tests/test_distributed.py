"""Several processes through the real launcher (torchrun, 2 CPU processes, gloo): one set of outputs written
by the main process, the same model as one process with the same global batch, and gradients that do not
depend on how the global batch is split (processes x batch x accumulation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, extraction_rows, write_jsonl
from safetensors.torch import load_file

from llm_finetune.config import load_config


@pytest.fixture
def data(tmp_path):
    rows = extraction_rows(40)
    for i, row in enumerate(rows):
        row["output"] += " ok" * (i % 7)  # variable lengths: the token-weighted loss must not depend on the split
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", extraction_rows(6, offset=40))
    return tmp_path


def _sets(root, model_dir, name, *extra):
    return [f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}",
            f"data.eval_file={root / 'eval.jsonl'}", "data.max_length=128", "method.dropout=0.0",
            "train.logging_steps=1", "train.learning_rate=5e-3", "train.seed=3", f"output.dir={root / name / 'ck'}",
            f"output.logs_dir={root / name / 'logs'}", "output.tensorboard=false", *extra]


def _torchrun(root, model_dir, name, *extra, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llm_finetune", "train", *[a for s in _sets(root, model_dir, name, *extra) for a in ("--set", s)]]
    done = subprocess.run(argv, cwd=str(root), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _one_process(root, model_dir, name, *extra):
    from llm_finetune.train import run

    return run(load_config(None, _sets(root, model_dir, name, *extra)))


def _metrics(root, name):
    return [json.loads(line) for line in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_write_one_set_of_outputs_and_train_the_single_process_model(data, tiny_model_dir):
    two = _torchrun(data, tiny_model_dir, "two", "train.max_steps=6", "train.batch_size=2")
    one = _one_process(data, tiny_model_dir, "one", "train.max_steps=6", "train.batch_size=4")

    assert two.stdout.count("Base vs tuned on") == 1  # evaluated and printed by the main process only
    steps = [r for r in _metrics(data, "two") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # every step logged once
    log = (data / "two" / "logs" / "training.log").read_text()
    assert log.count("step 3/6 ") == 1 and "(2 per process x 1 accumulation x 2 process(es))" in log
    manifest = json.loads((data / "two" / "ck" / "run_manifest.json").read_text())
    assert manifest["processes"] == {"world_size": 2, "per_device_batch": 2, "gradient_accumulation": 1,
                                     "global_batch": 4}
    assert one.manifest["processes"]["global_batch"] == 4
    assert [p.name for p in (data / "two" / "ck").iterdir() if not p.name.startswith(".")].count("adapter_model") == 1

    one_steps = [r for r in _metrics(data, "one") if "loss" in r]
    assert [r["num_input_tokens_seen"] for r in steps] == [r["num_input_tokens_seen"] for r in one_steps]
    for a, b in zip(steps, one_steps):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"])
    wa = load_file(data / "two" / "ck" / "adapter_model" / "adapter_model.safetensors")
    wb = load_file(one.adapter_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-5, rtol=0)


def test_the_gradients_do_not_depend_on_how_the_global_batch_is_split(data, tiny_model_dir):
    """Variable-length examples, one SGD step with learning rate 1 and no clipping, so the adapter's change is
    exactly the gradient: (batch 8, accumulation 1), (batch 1, accumulation 8) and 2 processes x (batch 2,
    accumulation 2) give the same gradients and the same logged loss (sum over supervised tokens / the
    global batch's supervised tokens, whatever the split)."""
    sgd = ["train.max_steps=1", "train.optimizer=sgd", "train.learning_rate=1.0", "train.max_grad_norm=0",
           "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.packing=false"]
    whole = _one_process(data, tiny_model_dir, "b8", *sgd, "train.batch_size=8")
    accumulated = _one_process(data, tiny_model_dir, "b1a8", *sgd, "train.batch_size=1",
                               "train.gradient_accumulation_steps=8")
    _torchrun(data, tiny_model_dir, "p2b2a2", *sgd, "train.batch_size=2", "train.gradient_accumulation_steps=2")

    loss = {n: [r for r in _metrics(data, n) if "loss" in r][0]["loss"] for n in ("b8", "b1a8", "p2b2a2")}
    assert abs(loss["b1a8"] - loss["b8"]) <= 1e-5 * loss["b8"] and abs(loss["p2b2a2"] - loss["b8"]) <= 1e-5 * loss["b8"]
    reference = load_file(whole.adapter_dir / "adapter_model.safetensors")
    for other in (accumulated.adapter_dir, data / "p2b2a2" / "ck" / "adapter_model"):
        weights = load_file(other / "adapter_model.safetensors")
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], atol=1e-5, rtol=0)
    moved = max((reference[k] - w).abs().max().item() for k, w in
                load_file(_one_process(data, tiny_model_dir, "b8_again", *sgd, "train.batch_size=8",
                                       "train.learning_rate=1e-12").adapter_dir / "adapter_model.safetensors").items())
    assert moved > 1e-3  # the step moved the adapter: the comparison above compares real gradients

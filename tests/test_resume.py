"""Interruption and resume: SIGTERM mid-run writes a checkpoint and stops non-zero; --resume continues to
the same per-step losses and the same adapter, bit for bit; a cut checkpoint is skipped; a changed config
refuses; logs and metrics are appended, with the resume marked."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import extraction_rows, write_jsonl
from safetensors.torch import load_file
from transformers import TrainerCallback

from llm_finetune.config import load_config
from llm_finetune.errors import ConfigError, TrainingInterrupted


def _cfg(root, model_dir, name, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}", "data.eval_file=null",
        "data.max_length=128", "method.dropout=0.1", "train.learning_rate=5e-3", "train.max_steps=10",
        "train.logging_steps=1", "train.batch_size=4", "train.seed=3", f"output.dir={root / name / 'ck'}",
        f"output.logs_dir={root / name / 'logs'}", "output.tensorboard=false", *extra])


class _SignalAt(TrainerCallback):
    """Sends the process SIGTERM during optimizer step `step`, as `kill` from outside would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _losses(root, name):
    rows = [json.loads(line) for line in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if r.get("event") == "resume"]


@pytest.fixture
def data(tmp_path):
    rows = extraction_rows(40)
    for i, row in enumerate(rows):
        row["output"] += " ok" * (i % 5)
    write_jsonl(tmp_path / "train.jsonl", rows)
    return tmp_path


def _patch_trainer(monkeypatch, change):
    """Every trainer the recipe builds gets `change(trainer)`: a fault injected from outside the product.
    Returns the function that puts the recipe back."""
    import llm_finetune.train as train_module

    build = train_module.build_trainer

    def build_changed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        change(trainer)
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", build_changed)
    return lambda: monkeypatch.setattr(train_module, "build_trainer", build)


def _interrupted(root, model_dir, monkeypatch, name="cut", step=3, match=None):
    """A run of `name` stopped by SIGTERM during optimizer step `step`."""
    from llm_finetune.train import run

    restore = _patch_trainer(monkeypatch, lambda trainer: trainer.add_callback(_SignalAt(step)))
    with pytest.raises(TrainingInterrupted, match=match):
        run(_cfg(root, model_dir, name))
    restore()


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(data, tiny_model_dir, monkeypatch):
    import llm_finetune.train as train_module

    root = data
    whole = train_module.run(_cfg(root, tiny_model_dir, "whole"))
    _interrupted(root, tiny_model_dir, monkeypatch, step=5, match=r"SIGTERM after step 5 of 10.*checkpoint-5.*--resume")
    assert (root / "cut" / "ck" / "checkpoint-5").is_dir()
    assert not (root / "cut" / "ck" / "adapter_model").exists()  # an interrupted run writes no final adapter

    resumed = train_module.run(_cfg(root, tiny_model_dir, "cut"), resume=True)
    whole_log, _ = _losses(root, "whole")
    cut_log, events = _losses(root, "cut")
    assert events == [{"event": "resume", "step": 5}]
    assert [r["step"] for r in cut_log] == list(range(1, 11))  # history kept, each step once
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in whole_log]  # bit for bit
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (root / "cut" / "logs" / "training.log").read_text()
    assert "SIGTERM: stopped after step 5" in log and "resumed at step 5 of 10" in log  # appended, not replaced


def test_a_cut_checkpoint_is_skipped_and_a_changed_config_refuses(data, tiny_model_dir, monkeypatch):
    from llm_finetune.resume import latest_checkpoint
    from llm_finetune.train import run

    root = data
    _interrupted(root, tiny_model_dir, monkeypatch)
    good = root / "cut" / "ck" / "checkpoint-3"
    cut = root / "cut" / "ck" / "checkpoint-4"  # a newer checkpoint whose weights were cut short mid-write
    cut.mkdir()
    for f in good.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    folder, skipped = latest_checkpoint(root / "cut" / "ck")
    assert folder == good and len(skipped) == 1 and "cut short" in skipped[0]

    with pytest.raises(ConfigError, match=r"(?s)train.learning_rate: 0.005 -> 0.001.*--allow-changed"):
        run(_cfg(root, tiny_model_dir, "cut", "train.learning_rate=1e-3"), resume=True)
    result = run(_cfg(root, tiny_model_dir, "cut", "train.learning_rate=1e-3"), resume=True, allow_changed=True)
    assert result.adapter_dir.is_dir()
    assert "resumed with a change (--allow-changed): train.learning_rate" in \
        (root / "cut" / "logs" / "training.log").read_text()


def test_resume_without_a_checkpoint_says_so(data, tiny_model_dir):
    from llm_finetune.train import run

    with pytest.raises(ConfigError, match="--resume: no complete checkpoint in .*start a new run without --resume"):
        run(_cfg(data, tiny_model_dir, "none"), resume=True)
    assert not (data / "none" / "logs").exists()  # refused before anything was written


def test_a_nan_loss_stops_before_the_optimizer_step_naming_the_examples(data, tiny_model_dir, monkeypatch):
    """The stock Trainer would log the NaN away and step on; here the run stops, naming the step and the
    rows (file:line) of the batch, keeps the checkpoint already written and writes no final adapter."""
    import llm_finetune.train as train_module
    from llm_finetune.errors import TrainingDiverged

    def poison_step_4(trainer):
        compute = trainer.compute_loss

        def poisoned(model, inputs, *a, **k):
            loss = compute(model, inputs, *a, **k)
            return loss * float("nan") if trainer.state.global_step == 3 else loss

        trainer.compute_loss = poisoned

    _patch_trainer(monkeypatch, poison_step_4)
    cfg = _cfg(data, tiny_model_dir, "nan", "train.save_steps=2")
    with pytest.raises(TrainingDiverged, match=r"step 4: the loss is nan; the batch held .*train.jsonl:\d+"):
        train_module.run(cfg)
    ck = data / "nan" / "ck"
    assert (ck / "checkpoint-2").is_dir() and not (ck / "adapter_model").exists()
    from llm_finetune.resume import checkpoint_problem

    assert checkpoint_problem(ck / "checkpoint-2") is None  # the last healthy checkpoint, intact


def test_a_non_finite_gradient_stops_before_the_optimizer_step(data, tiny_model_dir, monkeypatch):
    import llm_finetune.train as train_module
    from llm_finetune.errors import TrainingDiverged

    def inf_gradient_at_step_2(trainer):
        first = next(p for p in trainer.model.parameters() if p.requires_grad)
        first.register_hook(lambda g: g * float("inf") if trainer.state.global_step == 1 else g)

    _patch_trainer(monkeypatch, inf_gradient_at_step_2)
    with pytest.raises(TrainingDiverged, match=r"step 2: the gradient of .* is not finite; the batch held "):
        train_module.run(_cfg(data, tiny_model_dir, "inf"))


def test_an_unfinished_run_is_never_silently_restarted(data, tiny_model_dir, monkeypatch):
    from llm_finetune.train import run

    _interrupted(data, tiny_model_dir, monkeypatch)
    ck = data / "cut" / "ck"
    with pytest.raises(ConfigError, match=r"holds an unfinished run \(checkpoint-3 and no final adapter_model\): "
                                          r"continue it with --resume, or start over with --overwrite"):
        run(_cfg(data, tiny_model_dir, "cut"))
    assert (ck / "checkpoint-3").is_dir()  # untouched
    result = run(_cfg(data, tiny_model_dir, "cut"), overwrite=True)
    assert result.adapter_dir.is_dir() and not (ck / "checkpoint-3").exists()
    run(_cfg(data, tiny_model_dir, "cut"))  # a finished run is replaced as output.overwrite says (default: yes)


def test_a_second_run_into_the_same_folder_refuses_and_a_killed_one_leaves_no_lock(data, tiny_model_dir):
    import subprocess
    import sys
    import time

    from llm_finetune.train import run

    ck = data / "busy" / "ck"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, 'src'); from llm_finetune.resume import RunLock; "
        f"lock = RunLock({str(ck)!r}).acquire(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=str(__import__('conftest').ROOT))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another run \(pid {holder.pid} on .*\) is training into this folder"):
            run(_cfg(data, tiny_model_dir, "busy"))
    finally:
        holder.kill()  # kill -9: the run that held the lock is gone without cleaning up
        holder.wait()
    time.sleep(0.1)
    assert run(_cfg(data, tiny_model_dir, "busy")).adapter_dir.is_dir()  # the lock was not left stuck


def test_the_same_config_and_seed_give_the_same_adapter(data, tiny_model_dir):
    """Determinism on CPU (with dropout on, so the seeded RNG matters), and the seed is in the manifest."""
    from llm_finetune.train import run

    a = run(_cfg(data, tiny_model_dir, "one", "train.max_steps=4"))
    b = run(_cfg(data, tiny_model_dir, "two", "train.max_steps=4"))
    assert a.manifest["training"]["seed"] == 3
    wa = load_file(a.adapter_dir / "adapter_model.safetensors")
    wb = load_file(b.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in _losses(data, "one")[0]] == [r["loss"] for r in _losses(data, "two")[0]]


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_was_needed(data, tiny_model_dir, monkeypatch):
    """ENOSPC while the second checkpoint is written (after its weights, while the optimizer state is saved):
    the run stops with the space needed and free, the half-written checkpoint is removed, the first one is
    intact and the run resumes from it."""
    import errno

    from llm_finetune.errors import DiskFull
    from llm_finetune.resume import checkpoint_problem
    from llm_finetune.train import run
    from llm_finetune.trainer import FinetuneTrainer

    save = FinetuneTrainer._save_optimizer_and_scheduler

    def full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            (Path(output_dir) / "optimizer.pt").write_bytes(b"\0" * 100)  # what got written before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, output_dir)

    monkeypatch.setattr(FinetuneTrainer, "_save_optimizer_and_scheduler", full_at_step_4)
    with pytest.raises(DiskFull, match=r"needs about [\d.]+ MB \(the size of checkpoint-2\), [\d.]+ MB are free.*"
                                       r"checkpoint-2 is intact"):
        run(_cfg(data, tiny_model_dir, "full", "train.save_steps=2"))
    ck = data / "full" / "ck"
    assert not (ck / "checkpoint-4").exists() and checkpoint_problem(ck / "checkpoint-2") is None
    monkeypatch.setattr(FinetuneTrainer, "_save_optimizer_and_scheduler", save)
    assert run(_cfg(data, tiny_model_dir, "full", "train.save_steps=2"), resume=True).adapter_dir.is_dir()

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


def _sets(root, model_dir, name, *extra, dropout=True) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.train_file={root / 'train.jsonl'}", "data.eval_file=null",
            "data.max_length=128", *(["method.dropout=0.1"] if dropout else []), "train.learning_rate=5e-3",
            "train.max_steps=10", "train.logging_steps=1", "train.batch_size=4", "train.seed=3",
            f"output.dir={root / name / 'ck'}", f"output.logs_dir={root / name / 'logs'}", "output.tensorboard=false",
            *extra]


def _cfg(root, model_dir, name, *extra, dropout=True):
    return load_config(None, _sets(root, model_dir, name, *extra, dropout=dropout))


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


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


RESUMED_METHODS = {
    "dora": [],
    "adalora": ["method.adalora_init_r=6", "method.adalora_target_r=2", "method.adalora_tinit_ratio=0.2",
                "method.adalora_tfinal_ratio=0.2"],
    "ia3": ["train.learning_rate=2e-1"],
    "prompt_tuning": ["method.prompt_init_text=Extract name, age and city as JSON.", "train.learning_rate=3e-1"],
    "prefix_tuning": ["method.num_virtual_tokens=8", "train.learning_rate=1e-1"],
    "full": ["train.learning_rate=1e-3"],
}


@pytest.mark.parametrize("name", list(RESUMED_METHODS))
def test_resume_reproduces_every_method(name, data, tiny_model_dir, monkeypatch):
    """Stopped at step 4 of 8 and resumed: the same per-step losses and the same final weights as the
    uninterrupted run, bit for bit (AdaLoRA: its rank allocator's importance scores travel in the
    checkpoint; prompt tuning: the virtual tokens; full: every weight)."""
    import llm_finetune.train as train_module

    extra = [f"method.name={name}", "train.max_steps=8", *RESUMED_METHODS[name]]
    lora = name in ("dora", "adalora")
    whole = train_module.run(_cfg(data, tiny_model_dir, "whole", *extra, dropout=lora))
    restore = _patch_trainer(monkeypatch, lambda trainer: trainer.add_callback(_SignalAt(4)))
    with pytest.raises(TrainingInterrupted):
        train_module.run(_cfg(data, tiny_model_dir, "cut", *extra, dropout=lora))
    restore()
    resumed = train_module.run(_cfg(data, tiny_model_dir, "cut", *extra, dropout=lora), resume=True)
    assert [r["loss"] for r in _losses(data, "cut")[0]] == [r["loss"] for r in _losses(data, "whole")[0]]
    a, b = _weights(whole.adapter_dir), _weights(resumed.adapter_dir)
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoints_are_renamed_into_place_the_last_k_kept_and_the_best_never_rotated_out(data, tiny_model_dir,
                                                                                           monkeypatch):
    """save_total_limit=2 with evaluations every 2 steps whose best comes early (step 4): the best checkpoint
    survives every rotation, with the newest; each checkpoint was complete before it got its name."""
    import llm_finetune.train as train_module
    from llm_finetune.resume import checkpoint_problem
    from llm_finetune.trainer import FinetuneTrainer

    write_jsonl(data / "eval.jsonl", extraction_rows(6, offset=40))
    losses = {2: 1.0, 4: 0.5, 6: 0.9, 8: 0.8, 10: 0.7}
    seen_at_save = []

    def scripted_evaluation(trainer):
        def evaluate(*args, **kwargs):
            metrics = {"eval_loss": losses[trainer.state.global_step]}
            trainer.log(metrics)
            return metrics
        trainer.evaluate = evaluate

    save_rng = FinetuneTrainer._save_rng_state

    def watched_save(self, output_dir):  # midway through a checkpoint's write: where is it written?
        name = f"checkpoint-{self.state.global_step}"
        seen_at_save.append((Path(output_dir).parent.name, (Path(self.args.output_dir) / name).exists()))
        return save_rng(self, output_dir)

    _patch_trainer(monkeypatch, scripted_evaluation)
    monkeypatch.setattr(FinetuneTrainer, "_save_rng_state", watched_save)
    result = train_module.run(_cfg(data, tiny_model_dir, "keep", f"data.eval_file={data / 'eval.jsonl'}",
                                   "train.eval_steps=2", "train.save_steps=2", "train.save_total_limit=2"))
    ck = data / "keep" / "ck"
    assert sorted(p.name for p in ck.glob("*checkpoint*")) == ["best_checkpoint.json", "checkpoint-10", "checkpoint-4"]
    assert json.loads((ck / "best_checkpoint.json").read_text())["checkpoint"] == "checkpoint-4"
    assert all(checkpoint_problem(c) is None for c in (ck / "checkpoint-4", ck / "checkpoint-10"))
    assert seen_at_save == [(f".checkpoint-{n}.partial", False) for n in (2, 4, 6, 8, 10)]
    assert not list(ck.glob(".*partial"))
    best = load_file(ck / "checkpoint-4" / "adapter_model.safetensors")
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)  # train.load_best_at_end: the final adapter is the best


def test_resume_with_evaluations_keeps_the_best_checkpoint_tracking(data, tiny_model_dir, monkeypatch):
    """train.eval_steps with best-checkpoint tracking on: stopped and resumed, the run evaluates at the same
    steps with the same losses, names the same best checkpoint and ends with the same adapter."""
    import llm_finetune.train as train_module

    write_jsonl(data / "eval.jsonl", extraction_rows(6, offset=40))
    extra = [f"data.eval_file={data / 'eval.jsonl'}", "train.eval_steps=2", "train.save_steps=2",
             "train.save_total_limit=1", "train.max_steps=8"]
    whole = train_module.run(_cfg(data, tiny_model_dir, "whole", *extra))
    restore = _patch_trainer(monkeypatch, lambda trainer: trainer.add_callback(_SignalAt(5)))
    with pytest.raises(TrainingInterrupted):
        train_module.run(_cfg(data, tiny_model_dir, "cut", *extra))
    restore()
    resumed = train_module.run(_cfg(data, tiny_model_dir, "cut", *extra), resume=True)

    def evaluations(name):
        rows = [json.loads(line) for line in (data / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]

    assert evaluations("cut") == evaluations("whole") and len(evaluations("whole")) == 4
    best = [json.loads((data / n / "ck" / "best_checkpoint.json").read_text()) for n in ("whole", "cut")]
    assert best[0]["checkpoint"] == best[1]["checkpoint"] and best[0]["eval_loss"] == best[1]["eval_loss"]
    assert (data / "cut" / "ck" / best[1]["checkpoint"]).is_dir()
    a, b = _weights(whole.adapter_dir), _weights(resumed.adapter_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLED_WHILE_SAVING = """
import os, signal, sys
sys.path.insert(0, {src!r})
from llm_finetune.trainer import FinetuneTrainer

save_rng = FinetuneTrainer._save_rng_state

def killed(self, output_dir):  # the weights and optimizer state of checkpoint-6 are written; then kill -9
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)

FinetuneTrainer._save_rng_state = killed
from llm_finetune.cli import main
sys.exit(main(["train", *[a for s in {sets!r} for a in ("--set", s)]]))
"""


def test_kill_9_while_a_checkpoint_is_written_then_resume_reproduces_the_run(data, tiny_model_dir):
    """A real kill -9 (no handler runs, nothing is cleaned up) halfway through writing checkpoint-6: the
    previous checkpoint is intact, the half-written one never got its name, and --resume continues from
    checkpoint-3 (removing the partial one) to the same per-step losses and adapter as a run never killed."""
    import subprocess
    import sys

    from conftest import ROOT

    from llm_finetune.resume import checkpoint_problem, latest_checkpoint
    from llm_finetune.train import run

    extra = ("train.save_steps=3",)
    whole = run(_cfg(data, tiny_model_dir, "whole", *extra))
    script = KILLED_WHILE_SAVING.format(src=str(ROOT / "src"), sets=_sets(data, tiny_model_dir, "cut", *extra))
    killed = subprocess.run([sys.executable, "-c", script], cwd=str(data), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ck = data / "cut" / "ck"
    assert sorted(p.name for p in ck.iterdir() if "checkpoint" in p.name) == [".checkpoint-6.partial", "checkpoint-3"]
    assert list((ck / ".checkpoint-6.partial").rglob("*.safetensors"))  # it was killed mid-write
    assert checkpoint_problem(ck / "checkpoint-3") is None and latest_checkpoint(ck) == (ck / "checkpoint-3", [])

    resumed = run(_cfg(data, tiny_model_dir, "cut", *extra), resume=True)
    assert not (ck / ".checkpoint-6.partial").exists()
    assert ".checkpoint-6.partial: a checkpoint whose write never finished" in \
        (data / "cut" / "logs" / "training.log").read_text()
    rows = [json.loads(line) for line in (data / "cut" / "logs" / "metrics.jsonl").read_text().splitlines()]
    at = rows.index({"event": "resume", "step": 3})
    before, after = [r for r in rows[:at] if "loss" in r], [r for r in rows[at:] if "loss" in r]
    whole_losses = [r["loss"] for r in _losses(data, "whole")[0]]
    assert [r["step"] for r in before] == list(range(1, 7))  # what the killed run logged stays in the history
    assert [r["loss"] for r in before] == whole_losses[:6]
    assert [r["step"] for r in after] == list(range(4, 11)) and [r["loss"] for r in after] == whole_losses[3:]
    a, b = _weights(whole.adapter_dir), _weights(resumed.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spike_at(steps, factor=20.0):
    """Every trainer gets a loss `factor` times too high at the given optimizer steps (a bad batch)."""
    def change(trainer):
        compute = trainer.compute_loss

        def spiked(model, inputs, *a, **k):
            loss = compute(model, inputs, *a, **k)
            return loss * factor if trainer.state.global_step + 1 in steps else loss

        trainer.compute_loss = spiked
    return change


def test_the_spike_guard_rolls_back_and_skips_the_spiking_batch(data, tiny_model_dir, monkeypatch):
    """A loss 20x the recent mean at step 8: with checkpoints every 3 steps the run rolls back to checkpoint-6,
    replays step 7 and skips step 8's batch (named in the log and metrics.jsonl); the result is bit for bit
    the run that skipped the batch where it was (no checkpoint to roll back to), whose weights did not move
    at step 8; without the guard the spike is applied."""
    import llm_finetune.train as train_module

    guard = ["train.spike_guard=3", "train.spike_window=4", "train.max_steps=12"]
    moved = {}
    _patch_trainer(monkeypatch, _spike_at({8}))
    rolled = train_module.run(_cfg(data, tiny_model_dir, "rolled", *guard, "train.save_steps=3"))

    def watch_steps(trainer):
        _spike_at({8})(trainer)
        before = {}

        class Watch(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

            def on_step_end(self, args, state, control, model=None, **kwargs):
                moved[state.global_step] = any(not torch.equal(before[n], p) for n, p in model.named_parameters()
                                               if p.requires_grad)
        trainer.add_callback(Watch())

    _patch_trainer(monkeypatch, watch_steps)
    in_place = train_module.run(_cfg(data, tiny_model_dir, "in_place", *guard))
    assert moved[7] and not moved[8] and moved[9]
    _patch_trainer(monkeypatch, _spike_at({8}))
    unguarded = train_module.run(_cfg(data, tiny_model_dir, "unguarded", "train.max_steps=12"))

    rows = [json.loads(line) for line in (data / "rolled" / "logs" / "metrics.jsonl").read_text().splitlines()]
    spikes = [r for r in rows if r.get("event") == "loss_spike"]
    assert len(spikes) == 1 and spikes[0]["step"] == 8 and spikes[0]["loss"] > 3 * spikes[0]["recent_mean"]
    assert spikes[0]["action"] == "rolled back to checkpoint-6, batch skipped"
    assert len(spikes[0]["rows"]) == 4 and all("train.jsonl:" in r for r in spikes[0]["rows"])
    assert rows[rows.index(spikes[0]) + 1] == {"event": "resume", "step": 6}
    steps = [r["step"] for r in rows if "loss" in r and "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 12]  # step 7 replayed after the rollback
    log = (data / "rolled" / "logs" / "training.log").read_text()
    assert "loss spike at step 8" in log and "rolling back to" in log
    assert rolled.manifest["training"]["loss_spikes"][0]["step"] == 8
    a, b, c = (_weights(r.adapter_dir) for r in (rolled, in_place, unguarded))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_spike_guard_stops_a_run_that_keeps_spiking(data, tiny_model_dir, monkeypatch):
    import llm_finetune.train as train_module
    from llm_finetune.errors import TrainingDiverged

    _patch_trainer(monkeypatch, _spike_at({6, 7}))
    with pytest.raises(TrainingDiverged, match=r"step 7: loss .*one spike more than the guard skips "
                                               r"\(train.spike_max_skips=1; skipped: step 6\).*train.jsonl:\d+"):
        train_module.run(_cfg(data, tiny_model_dir, "spiky", "train.spike_guard=3", "train.spike_window=4",
                              "train.spike_max_skips=1"))


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_checkpoints_as_they_were(data, tiny_model_dir, monkeypatch):
    """Ctrl-C during step 3 asks for a checkpoint after the step; a second Ctrl-C while that checkpoint is
    being written stops at once: checkpoint-3 never appears (its partial write is removed) and checkpoint-2
    is byte for byte what it was."""
    import llm_finetune.train as train_module
    from llm_finetune.trainer import FinetuneTrainer

    class CtrlCAt(_SignalAt):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == self.step:
                os.kill(os.getpid(), signal.SIGINT)

    before = {}
    save_rng = FinetuneTrainer._save_rng_state

    def second_ctrl_c_mid_save(self, output_dir):
        if self.state.global_step == 3:
            ck2 = Path(self.args.output_dir) / "checkpoint-2"
            before.update({f.name: f.read_bytes() for f in ck2.iterdir()})
            os.kill(os.getpid(), signal.SIGINT)
        return save_rng(self, output_dir)

    monkeypatch.setattr(FinetuneTrainer, "_save_rng_state", second_ctrl_c_mid_save)
    _patch_trainer(monkeypatch, lambda trainer: trainer.add_callback(CtrlCAt(3)))
    handler = signal.getsignal(signal.SIGINT)  # Python's default; ignored where the suite runs in the background
    with pytest.raises(KeyboardInterrupt, match="SIGINT again: stopped at once"):
        train_module.run(_cfg(data, tiny_model_dir, "twice", "train.save_steps=2"))
    ck = data / "twice" / "ck"
    assert sorted(p.name for p in ck.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert before and {f.name: f.read_bytes() for f in (ck / "checkpoint-2").iterdir()} == before
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is what it was before the run again


def test_a_checkpoint_from_before_a_new_config_key_resumes_while_the_key_is_at_its_default():
    """A key added to the config after the checkpoint was written (an upgrade) is no change while it keeps its
    default; set to something else it is one."""
    from llm_finetune.resume import identity_changes

    current = {"config": load_config(None, []).to_dict(), "data": {}, "world_size": 1}
    saved = json.loads(json.dumps(current))
    del saved["config"]["preference"], saved["config"]["train"]["objective"]
    assert identity_changes(saved, current) == ([], [])
    changed = load_config(None, ["train.learning_rate=0.5"]).to_dict()
    changed["preference"]["simpo_gamma"] = 0.7
    lines, _ = identity_changes(saved, {**current, "config": changed})
    assert lines == ["preference.simpo_gamma: None -> 0.7", "train.learning_rate: None -> 0.5"]

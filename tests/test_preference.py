"""Preference tuning (train.objective dpo / kto / orpo / simpo) through TRL's trainers in this tool's engine:
each objective moves the preference accuracy on its training pairs, the reference of an adapter is the base
(the adapter switched off, no copy), preference rows are validated by line, and each objective's options are
its own."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from llm_finetune.config import load_config
from llm_finetune.errors import ConfigError, DataError


def _pairs(n: int = 32) -> list[dict]:
    """Half the prompts ask for "good", half for "bad!": the base prefers one word whatever the prompt (50%);
    learning the preference means following the prompt."""
    rows = []
    for i in range(n):
        word, other = ("good", "bad!") if i % 2 == 0 else ("bad!", "good")
        rows.append({"prompt": f"Say {word} {i}", "chosen": f"{word} {i}", "rejected": f"{other} {i}"})
    return rows


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    return tmp_path


def _cfg(root, model_dir, objective, *extra, name=None):
    name = name or objective
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_file={root / 'pairs.jsonl'}",
                              f"data.eval_file={root / 'pairs.jsonl'}", "data.max_length=128",
                              f"train.objective={objective}", "train.batch_size=4", "train.learning_rate=1e-2",
                              "train.logging_steps=4", f"output.dir={root / name / 'ck'}",
                              f"output.logs_dir={root / name / 'logs'}", "output.tensorboard=false", *extra])


@pytest.mark.parametrize("objective, steps", [("dpo", 16), ("kto", 32), ("orpo", 16), ("simpo", 16)])
def test_each_objective_moves_the_preference_accuracy_on_its_training_pairs(data, tiny_model_dir, objective, steps):
    from llm_finetune.preference_train import run

    result = run(_cfg(data, tiny_model_dir, objective, f"train.max_steps={steps}"))
    report = result.report
    assert report["n"] == 32 and report["base"]["preference_accuracy"] == pytest.approx(0.5, abs=0.2)
    assert report["tuned"]["preference_accuracy"] >= 0.9 and report["difference"]["ci95"][0] > 0
    assert report["reward_margin"]["mean"] > 0
    logged = [json.loads(line) for line in (data / objective / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in logged if "loss" in r]
    assert steps_logged and all("rewards/chosen" in r for r in steps_logged)  # TRL's metrics, in metrics.jsonl
    manifest = json.loads((result.adapter_dir / "run_manifest.json").read_text())
    assert manifest["objective"]["name"] == objective and manifest["evaluation"]["n"] == 32
    assert not (result.adapter_dir / "ref").exists()  # only the trained adapter is saved
    assert (result.adapter_dir / "preference_report.json").is_file()


def test_the_reference_of_an_adapter_is_the_base_switched_off_no_copy(data, tiny_model_dir):
    """DPO with a fresh LoRA adapter: TRL's reference pass runs the model with the adapter switched off, which
    gives a separately loaded base's logits exactly; no second copy of the adapter is kept."""
    from llm_finetune.models import load_model, resolve_source
    from llm_finetune.preference_train import build_preference_trainer, setup

    run = setup(_cfg(data, tiny_model_dir, "dpo", "train.max_steps=2"))
    try:
        trainer = build_preference_trainer(run, [])
        model = trainer.model
        assert list(model.peft_config) == ["default"]
        with torch.no_grad():  # move the adapter off zero, so "switched off" is tested, not "still zero"
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05)
        ids = torch.tensor([run.tokenizer("Say good 3")["input_ids"]])
        base = load_model(resolve_source(str(tiny_model_dir)), run.precision.load_name).eval()
        model.eval()
        with torch.no_grad():
            tuned = model(input_ids=ids).logits
            with model.disable_adapter():  # what TRL's use_adapter(model, None) does for the reference
                reference = model(input_ids=ids).logits
            expected = base(input_ids=ids).logits
        torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
        assert (tuned - expected).abs().max() > 1e-3
    finally:
        run.lock.release()


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "chosen": "same answer", "rejected": "same  answer"}, "are identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a"}, "missing required field(s) 'rejected'"),
    ({"prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]},
     "continue different prompts"),
])
def test_bad_preference_rows_are_named_by_line(tmp_path, row, reason):
    from llm_finetune.data.preference import load_preferences

    write_jsonl(tmp_path / "p.jsonl", _pairs(3) + [row])
    with pytest.raises(DataError, match=r"(?s)1 invalid row\(s\).*p.jsonl:4: .*" + reason.replace("(", r"\(")
                       .replace(")", r"\)")):
        load_preferences(tmp_path / "p.jsonl", "dpo")


def test_kto_rows_need_a_true_or_false_label_and_pairs_need_a_paired_objective(tmp_path):
    from llm_finetune.data.preference import load_preferences

    write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                       {"prompt": "q", "completion": "b", "label": "yes"}])
    with pytest.raises(DataError, match=r"k.jsonl:2: field 'label' must be true .* got 'yes'"):
        load_preferences(tmp_path / "k.jsonl", "kto")
    with pytest.raises(DataError, match=r"k.jsonl:1: a KTO row .* cannot train train.objective=dpo"):
        load_preferences(tmp_path / "k.jsonl", "dpo")


def test_every_preference_format_reads_to_the_same_prompt_and_answers(tmp_path):
    from llm_finetune.data.preference import load_preferences

    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"conversations": [{"from": "human", "value": "Name a colour."}], "chosen": {"from": "gpt", "value": "Blue."},
         "rejected": {"from": "gpt", "value": "No."}},
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]},
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    read, _ = load_preferences(tmp_path / "p.jsonl", "dpo")
    assert {json.dumps(r.trl_row()) for r in read} == {json.dumps(
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]})}
    kto, _ = load_preferences(tmp_path / "p.jsonl", "kto")  # a pair is two KTO rows: chosen good, rejected bad
    assert [(r.chosen.answer, r.label) for r in kto[:2]] == [("Blue.", True), ("No.", False)]


def test_each_objective_takes_only_its_own_options():
    with pytest.raises(ConfigError, match=r"preference.desirable_weight does not apply to train.objective='dpo' "
                                          r"\(it is read by: kto\)"):
        load_config(None, ["train.objective=dpo", "preference.desirable_weight=2"])
    with pytest.raises(ConfigError, match=r"preference.loss_type='kto' is not one of dpo's: sigmoid, hinge"):
        load_config(None, ["train.objective=dpo", "preference.loss_type=kto"])
    with pytest.raises(ConfigError, match=r"cannot train method.name=prompt_tuning: TRL's preference trainers"):
        load_config(None, ["train.objective=orpo", "method.name=prompt_tuning"])
    with pytest.raises(ConfigError, match=r"cannot train method.name=adalora: AdaLoRA adds its orthogonality"):
        load_config(None, ["train.objective=dpo", "method.name=adalora"])
    assert load_config(None, ["train.objective=kto", "preference.desirable_weight=2"]).preference.desirable_weight == 2
    assert not load_config(None, ["train.objective=simpo"]).packing  # TRL pads the pair's answers together


def test_data_check_and_preview_read_preference_rows_when_the_objective_says_so(data, tiny_model_dir, capsys):
    from llm_finetune.cli import main

    sets = ["--set", f"model.name_or_path={tiny_model_dir}", "--set", "data.max_length=128"]
    assert main(["data", "check", str(data / "pairs.jsonl"), *sets, "--set", "train.objective=dpo"]) == 0
    out = capsys.readouterr().out
    assert "32 pair(s), 0 invalid" in out and "chosen: 32 answer(s)" in out and "rejected: 32 answer(s)" in out
    write_jsonl(data / "bad.jsonl", _pairs(2) + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    assert main(["data", "check", str(data / "bad.jsonl"), *sets, "--set", "train.objective=orpo"]) == 1
    assert "bad.jsonl:3: the chosen and the rejected answer are identical" in capsys.readouterr().out
    assert main(["data", "preview", str(data / "pairs.jsonl"), "-n", "1", *sets, "--set", "train.objective=dpo"]) == 0
    out = capsys.readouterr().out
    assert "pairs.jsonl:1" in out and "[chosen, " in out and "] good 0" in out and "[rejected, " in out


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo", "simpo"])
def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_adapter(data, tiny_model_dir, monkeypatch, objective):
    """The engine's guarantees carry over to TRL's trainers, for every objective: SIGTERM finishes the step and
    writes a checkpoint, --resume continues to the adapter of a run never interrupted."""
    import os
    import signal

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import llm_finetune.preference_train as recipe
    from llm_finetune.errors import TrainingInterrupted

    class SignalAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    build = recipe.build_preference_trainer
    monkeypatch.setattr(recipe, "build_preference_trainer", lambda run, extra: build(run, [*extra, SignalAt()]))
    cfg = _cfg(data, tiny_model_dir, objective, "train.max_steps=6", "train.learning_rate=5e-3")
    with pytest.raises(TrainingInterrupted, match="after step 3 of 6"):
        recipe.run(cfg)
    assert (data / objective / "ck" / "checkpoint-3").is_dir()
    monkeypatch.setattr(recipe, "build_preference_trainer", build)
    resumed = recipe.run(cfg, resume=True)
    never = recipe.run(_cfg(data, tiny_model_dir, objective, "train.max_steps=6", "train.learning_rate=5e-3",
                            name="never"))
    a = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    b = load_file(never.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo", "simpo"])
def test_a_nan_loss_stops_every_objective_before_the_optimizer_step(data, tiny_model_dir, monkeypatch, objective):
    """The NaN guard holds under TRL's losses too: the run stops at that step naming its rows (file:line), the
    checkpoint already written stays, and no adapter is written."""
    import llm_finetune.preference_train as recipe
    from llm_finetune.errors import TrainingDiverged
    from llm_finetune.resume import checkpoint_problem

    build = recipe.build_preference_trainer

    def poisoned_at_step_3(run, extra):
        trainer = build(run, extra)
        compute = trainer.compute_loss

        def poisoned(model, inputs, *a, **k):
            loss = compute(model, inputs, *a, **k)
            if trainer.state.global_step == 2:
                return (loss[0] * float("nan"), *loss[1:]) if isinstance(loss, tuple) else loss * float("nan")
            return loss

        trainer.compute_loss = poisoned
        return trainer

    monkeypatch.setattr(recipe, "build_preference_trainer", poisoned_at_step_3)
    with pytest.raises(TrainingDiverged, match=r"step 3: the loss is nan; the batch held .*pairs.jsonl:\d+"):
        recipe.run(_cfg(data, tiny_model_dir, objective, "train.max_steps=6", "train.save_steps=2"))
    ck = data / objective / "ck"
    assert (ck / "checkpoint-2").is_dir() and checkpoint_problem(ck / "checkpoint-2") is None
    assert not (ck / "adapter_model").exists()


def test_reference_log_probs_are_cached_equal_fresh_ones_and_a_changed_template_or_model_misses(
        data, tiny_model_dir, tmp_path, monkeypatch):
    """DPO scores the reference once before training and keeps the scores: a second run (another beta) reads
    them instead of running the reference pass; they equal freshly computed ones; a changed template or a
    changed model misses the cache."""
    from conftest import build_tiny_llama, build_tokenizer

    import llm_finetune.preference_train as recipe
    from llm_finetune.reference_cache import COLUMNS

    monkeypatch.setenv("LLM_FINETUNE_CACHE", str(tmp_path / "cache"))
    passes = []
    build = recipe.build_preference_trainer

    def counting(run, extra):
        trainer = build(run, extra)
        passes.append({c: list(trainer.train_dataset[c]) for c in COLUMNS["dpo"]})
        return trainer

    monkeypatch.setattr(recipe, "build_preference_trainer", counting)
    recipe.run(_cfg(data, tiny_model_dir, "dpo", "train.max_steps=2", name="first"))
    assert "not cached yet" in (data / "first" / "logs" / "training.log").read_text()
    recipe.run(_cfg(data, tiny_model_dir, "dpo", "train.max_steps=2", "preference.beta=0.3", name="second"))
    assert "read from the cache" in (data / "second" / "logs" / "training.log").read_text()
    recipe.run(_cfg(data, tiny_model_dir, "dpo", "train.max_steps=2", "preference.cache_reference=false",
                    name="fresh"))
    for column in COLUMNS["dpo"]:
        torch.testing.assert_close(torch.tensor(passes[1][column]), torch.tensor(passes[2][column]), atol=1e-5,
                                   rtol=0)
    recipe.run(_cfg(data, tiny_model_dir, "dpo", "train.max_steps=2", "data.template=alpaca", name="template"))
    assert "not cached yet" in (data / "template" / "logs" / "training.log").read_text()
    build_tiny_llama(tmp_path / "other_model", build_tokenizer(tmp_path / "tok2"), seed=1)  # same shapes
    recipe.run(_cfg(data, tmp_path / "other_model", "dpo", "train.max_steps=2", name="model"))
    assert "not cached yet" in (data / "model" / "logs" / "training.log").read_text()


@pytest.mark.parametrize("method", ["full", "ia3", "dora", "qlora", "rslora"])
def test_dpo_trains_the_other_methods_too(data, tiny_model_dir, method):
    """Full fine-tuning (its reference: the weights scored before the first step, the base reloaded for the
    report), IA3, DoRA, QLoRA (a 4-bit base, its reference the same quantised weights) and rsLoRA under DPO: the
    preference accuracy on the training pairs moves."""
    from llm_finetune.preference_train import run

    lr, steps = {"full": ("1e-3", 16), "ia3": ("5e-1", 24), "dora": ("1e-2", 16), "qlora": ("1e-2", 16),
                 "rslora": ("2.5e-3", 16)}[method]  # rsLoRA: alpha/sqrt(r), 4x LoRA's scale at r 16
    result = run(_cfg(data, tiny_model_dir, "dpo", f"method.name={method}", f"train.max_steps={steps}",
                      f"train.learning_rate={lr}", "eval.max_new_tokens=4", name=method))
    report = result.report
    assert report["tuned"]["preference_accuracy"] > report["base"]["preference_accuracy"] + 0.2, report


def test_a_preference_adapter_is_saved_and_checked_as_an_sft_one(data, tiny_model_dir):
    """The preference recipe saves through the same step as SFT: the shapes are checked, and with
    output.verify_reload the saved folder is loaded back and gives the trained model's loss on a fixed batch."""
    from llm_finetune.preference_train import run

    result = run(_cfg(data, tiny_model_dir, "dpo", "train.max_steps=2", "output.verify_reload=always"))
    check = result.manifest["saved_check"]
    assert check["tensors"] > 0 and check["sharded"] is False
    assert check["reload"]["relative_difference"] <= 1e-5

"""The first screen and the adapter folder (issue 9, item 16).

- Library notices that ask nothing of the user (bitsandbytes' kernels-community notice, transformers'
  deprecation FutureWarnings) go to logs/training.log, not the terminal; our output and real errors still show.
- An adapter trained on a base with a Hub id (the built-in model) names that id in adapter_config.json,
  while our own commands still find the local copy through run_manifest.json.
- The adapter folder's README.md is our model card, not PEFT's empty template.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from result_helpers import train_tiny_adapter

from llm_finetune import models
from llm_finetune.cli import main
from llm_finetune.hub import method_options, plan_push, write_adapter_card

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PEFT_TEMPLATE = ("[More Information Needed]", "Model Card for Model ID")


def _assert_our_card(card: str, base: str) -> None:
    assert not any(marker in card for marker in PEFT_TEMPLATE), card[:400]
    assert "- llm-finetune" in card and "library_name: peft" in card
    assert f"fine-tune of **{base}**" in card
    assert '- name: `"lora"`' in card and "- dropout: `0.1`" in card
    # Only the options lora reads, and none of them null.
    assert "`null`" not in card and "adalora" not in card and "num_virtual_tokens" not in card


# ---------------------------------------------------------------------------------------------
# The first screen


def test_library_notices_go_to_the_log_and_the_folder_has_our_card(tiny_project):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "llm_finetune", "train", "--config", str(tiny_project / "config.json"),
                           "--set", "train.max_steps=3", "--set", "method.dropout=0.1"],
                          capture_output=True, text=True, env=env, cwd=tiny_project, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    terminal = proc.stdout + proc.stderr
    log_text = (tiny_project / "logs" / "training.log").read_text()
    # PEFT reads the deprecated property on every run: the FutureWarning is raised, and lands in the log only.
    assert "is_gradient_checkpointing" not in terminal and "FutureWarning" not in terminal
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in log_text
    # bitsandbytes' notice appears only on CPUs with AVX512-BF16 and no `kernels`; it never reaches the terminal.
    assert "kernels-community" not in terminal
    # Ours still shows: the progress bar, the table, where the adapter is.
    assert "train:" in proc.stderr and "Base vs tuned" in proc.stdout and "adapter:" in proc.stdout

    adapter = tiny_project / "checkpoints" / "adapter_model"
    model_dir = json.loads((tiny_project / "config.json").read_text())["model"]["name_or_path"]
    card = (adapter / "README.md").read_text()
    _assert_our_card(card, model_dir)
    assert "| eval_loss |" in card  # the evaluation, added after the save, is in the card
    # A local base has no Hub id: adapter_config.json keeps its path (nothing better exists).
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == model_dir


def test_library_records_before_the_log_exists_land_in_it_first(tmp_path, capsys, recwarn):
    from llm_finetune.quiet import library_output_to_log
    from llm_finetune.train import setup_logging

    recwarn.clear()  # what importing torch warns when this test runs first is not this test's
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with library_output_to_log():
        bnb.warning(notice)  # as bitsandbytes does at import time, before any log file exists
        # A warning raised in a library's code goes to the log; one raised in ours still shows.
        exec(compile("import warnings\nwarnings.warn('lib deprecation', FutureWarning)",
                     "/venv/lib/python3.11/site-packages/peft/fake.py", "exec"), {"__name__": "peft.fake"})
        exec(compile("import warnings\nwarnings.warn('our own warning', UserWarning)", "ours.py", "exec"),
             {"__name__": "llm_finetune.fake"})
        log_path = setup_logging(tmp_path / "logs")
        logging.getLogger("bitsandbytes.cextension").error("the native library failed to load")
        logging.getLogger("llm_finetune").info("ours, after the log exists")
    err = capsys.readouterr().err
    assert notice not in err and "lib deprecation" not in err
    assert "the native library failed to load" in err  # a library's error still shows
    assert [str(w.message) for w in recwarn] == ["our own warning"]
    lines = log_path.read_text().splitlines()
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in (notice, "lib deprecation", "the native library failed", "ours, after")}
    assert at[notice] < at["lib deprecation"] < at["the native library failed"] < at["ours, after"]
    assert "[bitsandbytes.backends.cpu.ops]" in lines[at[notice]]

    # Afterwards everything is as it was: records propagate again, nothing is held.
    assert logging.getLogger("bitsandbytes").propagate
    assert not [h for h in logging.getLogger("bitsandbytes").handlers if type(h).__name__ == "_Relay"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(compile("import warnings\nwarnings.warn('after', FutureWarning)",
                     "/venv/lib/python3.11/site-packages/peft/fake.py", "exec"), {"__name__": "peft.fake"})
    assert [str(w.message) for w in seen] == ["after"]


def test_held_library_messages_show_when_the_run_crashes_before_the_log(capsys):
    from llm_finetune.quiet import library_output_to_log

    with pytest.raises(RuntimeError):
        with library_output_to_log(quiet_errors=(ValueError,)):
            logging.getLogger("transformers.modeling_utils").warning("a hint about the crash")
            raise RuntimeError("crash")
    assert "a hint about the crash" in capsys.readouterr().err
    with pytest.raises(ValueError):  # a user error: its own message says it all
        with library_output_to_log(quiet_errors=(ValueError,)):
            logging.getLogger("transformers.modeling_utils").warning("noise")
            raise ValueError("bad config")
    assert "noise" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# An adapter on a base with a Hub id (the built-in model), here the tiny model standing in for it


def _default_like(tiny_model_dir):
    real = models.resolve_source

    def resolve(name_or_path, gguf_file=None, revision=None):
        if name_or_path in ("default", "", None):
            return models.ModelSource(kind="default", load_path=str(tiny_model_dir), hub_id=HUB_ID,
                                      original="/nowhere/SmolLM2-135M-Instruct.Q4_1.gguf", sha256="0" * 64,
                                      notes=["weights: the tiny test model standing in for the built-in one"])
        return real(name_or_path, gguf_file, revision)

    return resolve


def _stand_in_for_default(mp, tiny_model_dir):
    """Every module that resolves a model source sees the tiny model as the built-in default."""
    import llm_finetune.evaluation.run as eval_run
    import llm_finetune.export.merge as merge_module
    import llm_finetune.generate as generate
    import llm_finetune.train as train

    for module in (models, train, generate, merge_module, eval_run):
        mp.setattr(module, "resolve_source", _default_like(tiny_model_dir))


@pytest.fixture(scope="module")
def default_adapter(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        _stand_in_for_default(mp, tiny_model_dir)
        return train_tiny_adapter(tmp_path_factory.mktemp("default_like"), "default", steps=4,
                                  extra=["method.dropout=0.1", "train.gradient_accumulation_steps=2",
                                         "train.batch_size=4"])


def test_adapter_config_names_the_hub_id_and_the_manifest_the_local_copy(default_adapter, tiny_model_dir):
    config = json.loads((default_adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    manifest = json.loads((default_adapter / "run_manifest.json").read_text())
    assert manifest["model"]["kind"] == "default" and manifest["model"]["load_path"] == str(tiny_model_dir)

    card = (default_adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + HUB_ID + "\n")
    _assert_our_card(card, HUB_ID)
    assert "| eval_loss |" in card and "tiny test model standing in" in card


def test_our_commands_still_find_the_local_copy_offline(default_adapter, tiny_model_dir, tmp_path, monkeypatch,
                                                        capsys):
    from llm_finetune.export.merge import merge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert json.loads((default_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    # The Hub id alone resolves to nothing here (offline, not cached): only the manifest can find the base.
    with pytest.raises(models.ModelSourceError):
        models.resolve_source(HUB_ID)
    _stand_in_for_default(monkeypatch, tiny_model_dir)
    assert main(["generate", "Bo Chen, 31, lives in Oslo.", "--adapter", str(default_adapter),
                 "--max-new-tokens", "4"]) == 0
    assert "error" not in capsys.readouterr().err
    result = merge(default_adapter, tmp_path / "merged")
    assert (result.out_dir / "config.json").is_file() and result.check.ok and result.base == "default"


def test_card_follows_the_files_in_the_folder(default_adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(default_adapter, folder)
    report = folder / "eval_report.json"
    held = report.read_text()
    report.unlink()
    write_adapter_card(folder)
    assert "No held-out evaluation was recorded" in (folder / "README.md").read_text()
    report.write_text(held)  # the evaluation is added to the folder: the card is written again
    write_adapter_card(folder)
    card = (folder / "README.md").read_text()
    assert "| eval_loss |" in card and "No held-out evaluation" not in card
    # `push` writes its own card from the same files, with the repository in the snippet.
    pushed = plan_push(folder, "me/tiny").card
    assert 'from_pretrained("me/tiny")' in pushed and "`null`" not in pushed and "adalora" not in pushed


def test_method_options_keep_what_the_method_reads():
    saved = {"name": "adalora", "r": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": "all-linear",
             "modules_to_save": [], "init_adapter": None, "num_virtual_tokens": None, "adalora_init_r": 16,
             "adalora_target_r": None, "ia3_feedforward_modules": None}
    assert method_options(saved) == {"name": "adalora", "alpha": 32.0, "dropout": 0.1,
                                     "target_modules": "all-linear", "adalora_init_r": 16}

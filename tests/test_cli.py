"""The CLI in-process (argv in, exit code out) and once as a real subprocess."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from conftest import ROOT

from llm_finetune.cli import main
from llm_finetune.cpu_memory import kernel_huge_pages


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "train" in out and "generate" in out


def test_config_error_exits_nonzero_with_message(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"train": {"epoch": 1}}))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "epochs" in err and "Traceback" not in err


def test_bad_set_value(capsys):
    assert main(["config", "--set", "train.batch_size=-1"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_config_keys_lists_every_key(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate" in out and "data.truncation" in out


def test_train_then_generate_in_process(tiny_project, capsys):
    config = str(tiny_project / "config.json")
    assert main(["train", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "Base vs tuned" in out and "exact_match" in out
    adapter = tiny_project / "checkpoints" / "adapter_model"
    model = json.loads((tiny_project / "config.json").read_text())["model"]["name_or_path"]
    assert main(["generate", "Bo Chen, 31, lives in Oslo.", "--model", model, "--adapter", str(adapter),
                 "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "error" not in captured.err


def test_train_as_subprocess(tiny_project):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llm_finetune", "train", "--config", str(tiny_project / "config.json"),
                           "--set", "train.max_steps=3"], capture_output=True, text=True, env=env, cwd=tiny_project,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tiny_project / "checkpoints" / "adapter_model" / "adapter_model.safetensors").is_file()
    assert "train:" in proc.stderr  # the progress bar
    # The command imports the package before torch, so a CPU run gets large tensors in huge-page mappings
    # (cpu_memory.py), says so in the log and records it in the manifest.
    # And the process's peak memory to the end of training is in both.
    memory = json.loads((tiny_project / "checkpoints" / "run_manifest.json").read_text())["memory"]
    log = (tiny_project / "logs" / "training.log").read_text()
    if platform.libc_ver()[0] == "glibc" and kernel_huge_pages()[0] and "MALLOC_MMAP_THRESHOLD_" not in env:
        assert memory["mmap_threshold"] == 2 << 20 and memory["huge_pages"] == "THP_MEM_ALLOC_ENABLE=1"
        assert "memory: tensors of 2 MiB or more in their own huge-page mappings" in log
    if sys.platform != "win32":
        assert 0.05 < memory["peak_rss_gb"] < 64
        assert f"peak memory {memory['peak_rss_gb']} GB" in log
    # And the installed console script exists and answers.
    exe = os.path.join(os.path.dirname(sys.executable), "llm-finetune")
    if os.path.exists(exe):
        assert subprocess.run([exe, "--help"], capture_output=True, timeout=60).returncode == 0


def test_run_finetune_script_rejects_bad_key(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_finetune.py"), "--set", "train.lr=1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "unknown key 'train.lr'" in proc.stderr

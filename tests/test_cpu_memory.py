"""CPU training's allocator settings (cpu_memory.py): large tensors in their own huge-page mappings.

The behaviour is process-wide, so it is checked in fresh processes: where a tensor's memory lands
(/proc/self/maps) after glibc's threshold would have climbed, and what stands when the user chose.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from llm_finetune.cpu_memory import kernel_huge_pages

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc on Linux")

PROBE = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {src!r})
    import llm_finetune  # before torch, as the command and the training script import it
    import torch
    from llm_finetune.cpu_memory import tune_for_cpu_training

    def in_heap(t):
        # does the tensor lie in the brk heap (glibc's main arena), rather than in a mapping of its own?
        address = t.data_ptr()
        for line in open("/proc/self/maps"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line.rstrip().endswith("[heap]")

    record = tune_for_cpu_training() if {tune} else None
    big = torch.ones(24 << 20, dtype=torch.uint8)  # freeing a 24 MiB mapping lifts glibc's own threshold to it
    del big
    heap = []
    for mib in (2, 3, 6):
        t = torch.ones(mib << 20, dtype=torch.uint8)
        heap.append(in_heap(t))
        del t
    has_heap = any(line.rstrip().endswith("[heap]") for line in open("/proc/self/maps"))
    print(json.dumps({{"record": record, "in_heap": heap, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                      "has_heap": has_heap}}))
""")


def _probe(tune: bool, **env) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES",
                                                               "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(src=str(ROOT / "src"), tune=tune)],
                         env={**full, **env}, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["has_heap"]:
        pytest.skip("this process has no brk heap (glibc's main arena in mappings): nothing to tell apart")
    return result


@pytest.mark.skipif(not kernel_huge_pages()[0], reason="the kernel's transparent huge pages are off")
def test_large_tensors_get_their_own_mappings_on_a_cpu_run():
    tuned = _probe(tune=True)
    assert tuned["thp"] == "1"  # set at import, before torch read it
    assert tuned["record"] == {"mmap_threshold": 2 << 20, "huge_pages": "THP_MEM_ALLOC_ENABLE=1"}
    # each tensor of 2 MiB or more is a mapping of its own, given back to the system when freed
    assert tuned["in_heap"] == [False, False, False], tuned
    # glibc's defaults: once a large block was freed, the same tensors come from the heap
    untouched = _probe(tune=False)
    assert untouched["in_heap"] == [True, True, True], untouched


def test_the_users_malloc_settings_and_a_late_import_stand():
    chosen = _probe(tune=True, MALLOC_MMAP_THRESHOLD_="33554432")
    assert "MALLOC_MMAP_THRESHOLD_" in chosen["record"]["left_as_is"]
    no_thp = _probe(tune=True, THP_MEM_ALLOC_ENABLE="0")
    assert no_thp["thp"] == "0" and "no huge pages" in no_thp["record"]["left_as_is"]
    assert no_thp["in_heap"] == [True, True, True]  # the threshold alone would cost a third of the speed


def test_torch_imported_first_leaves_the_allocator_alone():
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); import torch, llm_finetune, json, os; "
            "from llm_finetune.cpu_memory import tune_for_cpu_training; "
            "print(json.dumps([os.environ.get('THP_MEM_ALLOC_ENABLE'), tune_for_cpu_training()]))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    thp, record = json.loads(out.stdout.strip().splitlines()[-1])
    assert thp is None and "torch was imported before llm_finetune" in record["left_as_is"]

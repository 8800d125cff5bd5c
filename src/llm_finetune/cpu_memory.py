"""The C allocator's settings for training on a CPU: large tensors in their own huge-page mappings.

Why: glibc's malloc serves a block below its mmap threshold from the heap, and raises that threshold
(up to 32 MiB) each time it frees a larger mapping, so after the first step nearly every activation is
a heap block. A training step allocates and frees activations of many sizes, the ones saved for the
backward pass interleaved with temporaries (the bf16 copy each product makes of its input, its output
before the fp32 cast), and the holes the temporaries leave between live blocks stay resident.
Measured on real chat data (the built-in model, LoRA r16 all-linear, packed micro-batches of about
1,300 tokens, a bf16 base with fp32 activations): the live set peaks at 2.4 GB, the process at 5.8 GB.

So, for a run that trains on the CPU, every tensor of 2 MiB or more gets its own mapping, given back to
the system when it is freed: glibc's mmap threshold is fixed at 2 MiB (`mallopt`), and PyTorch advises
transparent huge pages for those tensors (`THP_MEM_ALLOC_ENABLE=1`, which PyTorch reads at its first
allocation, so the package sets it when it is imported before torch), so a fresh mapping costs one
page fault per 2 MiB instead of 512. Measured on the chat data above (an Intel Xeon with AMX, 2 cores,
`benchmarks/throughput.py`'s llm-finetune child, 4 steps), each setting in its own process, twice
(input tokens/s, peak RSS):

    glibc defaults                       265 / 298   5.79 / 5.80 GB
    huge pages alone                     260 / 276   4.97 / 4.91 GB
    threshold 4 MiB alone                272         5.63 GB      (the 2-4 MiB tensors stay in the heap)
    threshold 1 MiB + huge pages         201 / 159   3.64 GB      (1-2 MiB mappings get no huge pages)
    threshold 2 MiB + huge pages         251 / 228   3.96 / 3.93 GB   <- this
    threshold 4 MiB + huge pages         247 / 253   4.31 / 4.27 GB
    threshold 8 MiB + huge pages         252         4.49 GB

With an fp32 base (CPUs without bf16 units) the same change took peak RSS from 5.75 / 5.87 to
3.85 / 3.87 GB at 165 / 177 vs 196 / 207 tokens/s; on the demo task (short rows, few tensors of 2 MiB)
2.19 -> 2.10 GB at the same speed (319 / 272 vs 288 / 346 tokens/s).

A threshold the user set (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES) or another allocator (LD_PRELOAD)
stands; without huge pages (torch imported first, or the kernel's THP set to never) the threshold
alone costs a third of the speed, so it is left alone then too. What was done goes to the log and
the run manifest."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch: advise huge pages for CPU tensors of 2 MiB or more
MMAP_THRESHOLD = 2 * 1024 * 1024  # = PyTorch's huge-page size threshold, so every mapping gets huge pages
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
_KERNEL_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: dict = {"torch_first": None, "user_set": None, "applied": None}


def ask_for_huge_pages() -> None:
    """At package import: have PyTorch advise huge pages for its large CPU tensors, when torch is not
    imported yet (it reads the variable once). A value the user set stands."""
    _state["torch_first"] = "torch" in sys.modules
    _state["user_set"] = HUGE_PAGES_ENV in os.environ
    if not _state["torch_first"]:
        os.environ.setdefault(HUGE_PAGES_ENV, "1")


def huge_pages() -> tuple[bool, str]:
    """Does PyTorch put this process's large CPU tensors on huge pages? With the reason."""
    if _state["torch_first"] and not _state["user_set"]:
        return False, f"torch was imported before llm_finetune, so it did not read {HUGE_PAGES_ENV}=1"
    if os.environ.get(HUGE_PAGES_ENV) != "1":
        return False, f"{HUGE_PAGES_ENV} is not 1"
    kernel, why = kernel_huge_pages()
    return (True, f"{HUGE_PAGES_ENV}=1") if kernel else (False, why)


def kernel_huge_pages() -> tuple[bool, str]:
    """Does the kernel give transparent huge pages to a mapping that asks for them? With the reason."""
    try:
        mode = _KERNEL_THP.read_text()
    except OSError:
        return False, f"the kernel has no transparent huge pages ({_KERNEL_THP} is missing)"
    if "[never]" in mode:
        return False, f"the kernel's transparent huge pages are off ({_KERNEL_THP}: never)"
    return True, f"{_KERNEL_THP}: {mode.split('[')[1].split(']')[0]}"


def tune_for_this_run() -> dict:
    """tune_for_cpu_training where the run trains on the CPU; a GPU run's peak is not in host memory."""
    import torch

    if torch.cuda.is_available():
        return {"left_as_is": "the run trains on a GPU"}
    return tune_for_cpu_training()


def tune_for_cpu_training() -> dict:
    """Large tensors in their own huge-page mappings for this process (see the module's docstring), once.
    Returns what was done, for the log and the manifest: {"mmap_threshold": bytes, "huge_pages": why} when
    applied, else {"left_as_is": why}."""
    if _state["applied"] is None:
        _state["applied"] = _tune()
    return _state["applied"]


def _tune() -> dict:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {"left_as_is": "not glibc's malloc"}
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return {"left_as_is": f"another allocator is preloaded (LD_PRELOAD={preload})"}
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return {"left_as_is": "the malloc settings in the environment (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES) stand"}
    on, why = huge_pages()
    if not on:
        return {"left_as_is": f"no huge pages: {why}"}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return {"left_as_is": "mallopt(M_MMAP_THRESHOLD) refused"}
    return {"mmap_threshold": MMAP_THRESHOLD, "huge_pages": why}


def peak_rss_gb() -> float | None:
    """This process's peak resident memory so far, in GB (what `/usr/bin/time -v` calls the maximum resident
    set size); None where the platform does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)


def describe(record: dict) -> str:
    """The log line for tune_for_cpu_training's record."""
    if "left_as_is" in record:
        return f"allocator left as is: {record['left_as_is']}"
    return (f"tensors of {record['mmap_threshold'] >> 20} MiB or more in their own huge-page mappings (glibc mmap "
            f"threshold fixed, {record['huge_pages']}; on chat data it took peak memory from 5.8 to 4.0 GB, see "
            "cpu_memory.py); MALLOC_MMAP_THRESHOLD_ in the environment chooses otherwise")

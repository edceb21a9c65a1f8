"""The C allocator under loopdyn's passes: freed activations kept for the next pass.

A CPU pass allocates its activations with `malloc` and frees them as it goes. glibc's `malloc`
gives freed memory at the top of its heap back to the system once more than M_TRIM_THRESHOLD
bytes are free there, and serves a request over M_MMAP_THRESHOLD bytes with a fresh `mmap`;
both thresholds start at 128 KiB and move with the sizes the process has freed so far. Memory
given back is faulted in again, a zeroed 4 KiB page at a time, when the next pass allocates it.
Measured here (2 threads, `small` preset at 16 loops, 4 × 64 tokens, a fresh process each): a
forward pass took 0.18–0.22 s with glibc's defaults (2–34 k page faults per pass, varying from
process to process with the heap's history) and 0.15–0.17 s with the policy below (0–128).

`keep_freed_memory()` fixes both thresholds (glibc's `mallopt`):

* M_MMAP_THRESHOLD = 32 MiB (MMAP_BYTES, glibc's largest on 64-bit): requests up to 32 MiB come
  from the heap, larger ones are mapped and unmapped — faulted in on every pass, as `loopdyn
  plan`'s replay of each operator call meets them;
* M_TRIM_THRESHOLD = 256 MiB (TRIM_BYTES): up to 256 MiB of free heap is kept for the next pass,
  so a steady pass faults nothing in from the heap.

The same tensors are live at once, but the heap's holes now hold requests glibc would have
mapped: Ouro-2.6B's full bf16 audit peaked at 12.71 GiB resident against 12.30 GiB before (+3 %;
28.6 forward equivalents against 28.4); up to TRIM_BYTES of free heap stays resident. loopdyn's
command line sets this policy before it works (`loopdyn.cli`) and so does every grid run
(`gridstore.execute`); `loopdyn plan --measure` states the policy its times are for. It is left
alone — the process keeps the allocator it has — when:

* the C library is not glibc (macOS, musl) or has no `mallopt`;
* LOOPDYN_ALLOCATOR=system is set;
* the user tuned glibc's malloc already (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_,
  MALLOC_TOP_PAD_, or glibc.malloc.* in GLIBC_TUNABLES);
* another allocator is preloaded (jemalloc, tcmalloc, mimalloc in LD_PRELOAD).

In a script of your own: `from loopdyn.allocator import keep_freed_memory; keep_freed_memory()`.
"""
from __future__ import annotations

import ctypes
import os
import platform

MMAP_BYTES = 32 * 2 ** 20
TRIM_BYTES = 256 * 2 ** 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEPT = f"freed memory kept (glibc malloc: mmap over {MMAP_BYTES >> 20} MiB, trim over {TRIM_BYTES >> 20} MiB)"
_ENV_TUNED = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None  # what keep_freed_memory() did in this process, once it ran


def _reason_to_leave_alone() -> str | None:
    """Why this process's allocator is not ours to set (module docstring), else None."""
    if os.environ.get("LOOPDYN_ALLOCATOR", "").strip().lower() == "system":
        return "LOOPDYN_ALLOCATOR=system"
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in _PRELOADED if name in preload), None)
    if other:
        return f"{other} preloaded"
    tuned = [v for v in _ENV_TUNED if v in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return f"glibc malloc tuned by {', '.join(tuned)}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"the C library is not glibc ({platform.system()})"
    return None


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed activations for the next pass (module docstring), once
    per process; returns what this process's allocator does (`state()`). Never raises."""
    global _state
    if _state is None:
        reason = _reason_to_leave_alone()
        if reason is None:
            try:
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
                ok = mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES) == 1
                reason = None if ok else "mallopt refused the thresholds"
            except (OSError, AttributeError) as err:
                reason = f"no mallopt ({err})"
        _state = KEPT if reason is None else f"left alone: {reason}"
    return _state


def state() -> str:
    """What this process's allocator does with freed memory: KEPT after `keep_freed_memory()`
    set it, else why it was left alone, else glibc's defaults (not set in this process)."""
    return _state if _state is not None else "glibc's defaults or the process's own (not set by loopdyn)"


def kept() -> bool:
    """Whether `keep_freed_memory()` set the policy in this process."""
    return _state == KEPT

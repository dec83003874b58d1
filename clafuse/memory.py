"""Keeping the process's resident memory close to what fusion really holds.

Fusion allocates and frees large tensors step after step. With glibc's defaults, freed memory of
a few megabytes stays in the heap (and counts as resident), so every step's peak piles up. Both
helpers are no-ops where glibc is not the C library.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_libc: ctypes.CDLL | None | bool = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim, _libc.mallopt  # noqa: B018  (both exist: this is glibc)
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> None:
    """Serve allocations of ``mmap_threshold`` bytes or more from their own memory maps, which
    go back to the system as soon as they are freed, and keep up to ``trim_threshold`` bytes of
    freed memory at the top of the heap instead of returning it at every free (the command line
    calls this at start; :func:`release_memory` still returns it between the heavy steps).

    Every page returned to the system is paged in afresh by the kernel when used again. With a
    1 MB map threshold a Fashion-MNIST ResNet fuse --search spent 64 of its 105 s in the kernel;
    32 MB: 61 s (64 MB: 38 s but 1.2 GB peak instead of 0.8). Setting the map threshold also fixes
    glibc's trim threshold at 128 kB, so the heap still shrank and regrew around every
    activation tensor (33 s of kernel time in a 46 s search); at 256 MB the same search takes
    26 s (6 s in the kernel), its peak 0.80 GB instead of 0.75 (fuse_memory.md,
    resnet_timing.md hold the memory goals)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def release_memory() -> None:
    """Give freed heap memory back to the system (between the heavy steps of a fusion)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

"""Keeping the process's resident memory close to what fusion really holds.

Fusion allocates and frees large tensors step after step. With glibc's defaults, freed memory of
a few megabytes stays in the heap (and counts as resident), so every step's peak piles up. Both
helpers are no-ops where glibc is not the C library.
"""

from __future__ import annotations

import ctypes

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


def tune_allocator(mmap_threshold: int = 32 << 20) -> None:
    """Serve allocations of ``mmap_threshold`` bytes or more from their own memory maps, which
    go back to the system as soon as they are freed (the command line calls this at start).

    32 MB, not less: every such allocation is paged in afresh by the kernel, and with 1 MB a
    Fashion-MNIST ResNet fuse --search spent 64 of its 105 s in the kernel (61 s at 32 MB, 38 s
    at 64 MB but 1.2 GB peak instead of 0.8); peaks stay within the memory goals
    (fuse_memory.md, resnet_timing.md)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)


def release_memory() -> None:
    """Give freed heap memory back to the system (between the heavy steps of a fusion)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

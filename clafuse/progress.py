"""Progress of long steps on stderr: loading, recording activations, per-layer work, writing.

Every command reports through the one reporter :func:`reporting` installs; library code marks its
steps with :func:`step` and long loops with :func:`advance`, both no-ops while no reporter is
active (as in plain library use). Only a step still running after ``delay`` seconds (one by
default) is shown, so quick commands print nothing: on a terminal as a live status line (rich),
elsewhere as plain lines that stay readable in logs::

    clafuse: progress: fusing 3 layers ...
    clafuse: progress: fusing 3 layers: layer 2/3 (features.3)
    clafuse: progress: fusing 3 layers: done in 4.2 s

The fusion engine reports per layer by calling :func:`advance` (``done``, ``total``, ``name``)
inside the step that covers it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

PREFIX = "clafuse: progress: "
DEFAULT_DELAY = 1.0


class Reporter:
    """Shows the steps that run longer than ``delay`` seconds on ``stream``."""

    def __init__(self, stream: TextIO, delay: float | None = None, live: bool | None = None) -> None:
        self.stream = stream
        self.delay = DEFAULT_DELAY if delay is None else delay
        self.live = stream.isatty() if live is None else live
        self._lock = threading.Lock()
        self._steps: list[dict] = []
        self._status = None

    def _write(self, text: str) -> None:
        if self.live:
            if self._status is None:
                from rich.console import Console

                self._status = Console(file=self.stream).status(text)
                self._status.start()
            else:
                self._status.update(text)
        else:
            self.stream.write(PREFIX + text + "\n")
            self.stream.flush()

    def _announce(self, entry: dict) -> None:
        with self._lock:
            if not entry["done"] and not entry["shown"]:
                entry["shown"] = True
                entry["last"] = time.monotonic()
                self._write(f"{entry['what']} ...")

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        entry = {"what": what, "start": time.monotonic(), "shown": False, "done": False, "last": 0.0}
        timer = threading.Timer(self.delay, self._announce, (entry,))
        timer.daemon = True
        self._steps.append(entry)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            with self._lock:
                entry["done"] = True
                self._steps.remove(entry)
                if entry["shown"]:
                    elapsed = time.monotonic() - entry["start"]
                    if self.live and not self._steps and self._status is not None:
                        self._status.stop()
                        self._status = None
                        self.stream.write(f"{PREFIX}{what}: done in {elapsed:.1f} s\n")
                    elif not self.live:
                        self._write(f"{what}: done in {elapsed:.1f} s")

    def advance(self, done: int, total: int, name: str = "") -> None:
        """Per-item progress of the innermost step, shown once it runs long, at most once a second
        (and for the last item)."""
        with self._lock:
            if not self._steps:
                return
            entry = self._steps[-1]
            now = time.monotonic()
            if now - entry["start"] < self.delay or (now - entry["last"] < min(1.0, self.delay) and done < total):
                return
            entry["shown"] = True
            entry["last"] = now
            self._write(f"{entry['what']}: {done}/{total}" + (f" ({name})" if name else ""))

    def close(self) -> None:
        with self._lock:
            if self._status is not None:
                self._status.stop()
                self._status = None


_current: Reporter | None = None


@contextlib.contextmanager
def reporting(enabled: bool, stream: TextIO | None = None, delay: float | None = None) -> Iterator[Reporter | None]:
    """Make a reporter on ``stream`` (stderr) the active one while the block runs, when ``enabled``."""
    global _current
    previous = _current
    reporter = Reporter(stream if stream is not None else sys.stderr, delay) if enabled else None
    _current = reporter
    try:
        yield reporter
    finally:
        if reporter is not None:
            reporter.close()
        _current = previous


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Mark a step of the active reporter (nothing happens without one)."""
    if _current is None:
        yield
        return
    with _current.step(what):
        yield


def advance(done: int, total: int, name: str = "") -> None:
    """Report that ``done`` of ``total`` items of the current step are finished (e.g. the fusion
    engine after each layer); a no-op without an active reporter."""
    if _current is not None:
        _current.advance(done, total, name)

"""Running the ``clafuse`` command line inside the test process, as a terminal would show it.

Spawning an interpreter (and importing torch) per case would make the many bad-input and fuzz
cases slow; the Typer app is called directly instead, with stdout, stderr, warnings and the
``clafuse`` logger captured, and any exception that escapes it recorded as a traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

PROGRESS = "clafuse: progress: "


@dataclass
class Outcome:
    args: list[str]
    code: int
    stdout: str
    stderr: str
    progress: str = ""
    """The ``clafuse: progress:`` lines, kept out of ``stderr``: whether a step lasts long enough to
    show one depends on the machine's load, so the tests of messages do not see them."""

    def __str__(self) -> str:
        return f"clafuse {' '.join(self.args)!r} -> {self.code}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr}"


def invoke(*args: object, cwd: Path | None = None) -> Outcome:
    """Run the Typer app as ``clafuse ARGS`` (in ``cwd`` if given) and capture what a terminal would show."""
    from clafuse.cli import app

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("clafuse: warning: %(message)s"))
    logger = logging.getLogger("clafuse")
    logger.addHandler(handler)
    code: object = 0
    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", hidden)
            try:
                app(args=argv, prog_name="clafuse")
            except SystemExit as exc:
                code = exc.code
            except BaseException:  # noqa: BLE001 - an escaped exception is what these tests look for
                err.write(traceback.format_exc())
                code = 1
    finally:
        os.chdir(before)
        logger.removeHandler(handler)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    exit_code = code if isinstance(code, int) else (0 if code is None else 1)
    lines = (err.getvalue() + shown).splitlines(keepends=True)
    progress = [line for line in lines if line.startswith(PROGRESS)]
    return Outcome(argv, exit_code, out.getvalue(), "".join(line for line in lines if not line.startswith(PROGRESS)),
                   "".join(progress))


def assert_refused(res: Outcome, *needles: str) -> str:
    """Exit code 2 and exactly one ``clafuse: error:`` line holding every needle, with no traceback;
    the line is returned."""
    assert res.code == 2, str(res)
    assert "Traceback" not in res.stdout + res.stderr, str(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: "), str(res)
    for needle in needles:
        assert needle in lines[0], str(res)
    return lines[0]

"""What every ``clafuse`` command shares: the Typer app whose usage errors are one line, the
``guard`` that turns failures into one ``clafuse: error:`` line and an exit code, the per-command
session (threads, progress), warnings reported once, and the options several commands take.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

def _err(message: str) -> None:
    """Write ``message`` as exactly one line, control characters escaped (see :func:`printable`)."""
    from clafuse.errors import printable

    sys.stderr.write(printable(message) + "\n")


# The parser's own errors (typer vendors click in newer releases, so the class is found through
# typer's public BadParameter rather than imported from click).
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
    """Click's usage errors (a missing argument, an unknown option, ``--epochs abc``) as the one line
    ``clafuse: error: ...`` and exit code 2, like every other error, instead of a usage block."""

    def main(self, args: Any = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERROR as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain ``clafuse``: the help text
                exc.show()
                code = exc.exit_code
            else:
                command = ctx.command_path.partition(" ")[2] if ctx is not None else ""
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                _err(f"clafuse: error: {command + ': ' if command else ''}{exc.format_message().rstrip('.')}{hint}")
                code = exc.exit_code
        except typer.Abort:
            _err("clafuse: interrupted")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="clafuse",
    cls=_OneLineErrors,
    help="Fuse trained neural-network checkpoints, including networks of different depth and width.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads torch uses (default: half the usable cores, at least "
                                                  "1, which stays fast on a shared machine; 0 = torch's default).")
ProgressOpt = typer.Option(False, "--progress", help="Show progress of long steps on stderr also with --json.")
StripPrefixOpt = typer.Option(None, "--strip-prefix", help="Use only the tensors under this name prefix, without it "
                                                          "(e.g. model.); a prefix all names share is stripped "
                                                          "automatically when the rest fits a family.")
RenameOpt = typer.Option(None, "--rename", help="OLD=NEW: rename tensors by regular expression (re.sub), after "
                                                "--strip-prefix; repeatable, applied in order.")
IgnoreKeysOpt = typer.Option(None, "--ignore-keys", help="Leave out tensors whose name (as stored) matches this "
                                                         "regular expression; repeatable.")
KeepWrapperOpt = typer.Option(False, "--keep-wrapper", help="Write the output in the input's own form: its tensor "
                                                            "names and prefix and, for torch files, its wrapper (e.g. "
                                                            "a Lightning .ckpt) without optimizer state.")
NormalizeOpt = typer.Option(None, "--normalize", help="Standardise file and folder inputs per channel: MEAN,STD, "
                                                      "the means then the stds (one per channel), or mnist, "
                                                      "fashion-mnist, cifar10, imagenet.")


def emit(doc: Any, as_json: bool, render, threads: int | None = None) -> None:
    if as_json:
        if threads is not None and isinstance(doc, dict):
            doc = {**doc, "threads": threads}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        render(doc)


def console():
    from rich.console import Console

    return Console()


class Session:
    """What every command sets up first: torch's thread count and the progress reporter."""

    def __init__(self, threads: Optional[int], as_json: bool, show_progress: bool) -> None:
        from clafuse.threads import use_threads

        self.threads = use_threads(threads)
        self.show = show_progress or not as_json

    def __enter__(self) -> "Session":
        from clafuse.progress import reporting

        self._reporting = reporting(self.show)
        self._reporting.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._reporting.__exit__(*exc)


def key_map(strip_prefix: Optional[str], rename: Optional[List[str]], ignore_keys: Optional[List[str]]):
    from clafuse.io.keys import KeyMap

    return KeyMap.from_options(strip_prefix, rename or (), ignore_keys or ())


def terminate(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP end a run like Ctrl-C: temp files removed, exit code 130."""
    raise KeyboardInterrupt


class _Printable(logging.Filter):
    """Log records of the ``clafuse`` logger on one line, control characters escaped (file names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from clafuse.errors import printable

        record.msg, record.args = printable(record.getMessage()), None
        return True


_log = logging.getLogger("clafuse")
_log.addFilter(_Printable())
_QUIET = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _report_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Each distinct warning once, as one line through the ``clafuse`` logger (no source lines)."""
    seen = set()
    for w in caught:
        text = " ".join(str(w.message).split()) or w.category.__name__
        if len(text) > 300:
            text = text[:297] + "..."
        if (w.category, text) not in seen:
            seen.add((w.category, text))
            _log.warning(text)


def guard(command):
    """Turn every failure inside a command into one line on stderr and an exit code, and report
    Python's and torch's warnings once each, briefly, before it."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                if not sys.warnoptions:  # -W or PYTHONWARNINGS: the user's own filters apply
                    warnings.simplefilter("default")
                    for quiet in _QUIET:
                        warnings.simplefilter("ignore", quiet)
                try:
                    command(*args, **kwargs)
                finally:
                    _report_warnings(caught)
        except BaseException as exc:
            _fail(exc)

    return run


def _fail(exc: BaseException) -> None:
    """Print ``exc`` as one line and exit with its code (re-raise what is no failure)."""
    from clafuse.errors import ClafuseError

    if isinstance(exc, ClafuseError):
        _err(f"clafuse: error: {exc}")
        raise typer.Exit(2) from None
    if isinstance(exc, KeyboardInterrupt):
        _err("clafuse: interrupted")
        raise typer.Exit(130) from None
    if isinstance(exc, (typer.Exit, typer.BadParameter, SystemExit, GeneratorExit)):
        raise exc
    if os.environ.get("CLAFUSE_DEBUG"):
        raise exc
    if isinstance(exc, OSError):  # a path the system refuses (name too long, permission denied, ...): bad input
        where = f"{exc.filename}: " if exc.filename is not None else ""
        _err(f"clafuse: error: {where}{exc.strerror or exc}")
        raise typer.Exit(2) from None
    if isinstance(exc, Exception):  # the last line of defence: no traceback for users
        _err(f"clafuse: internal error: {type(exc).__name__}: {exc} (set CLAFUSE_DEBUG=1 for a traceback)")
        raise typer.Exit(1) from None
    raise exc

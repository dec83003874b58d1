"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""

import unicodedata


class ClafuseError(Exception):
    """Bad input: a missing or corrupt file, a spec that does not fit, data of the wrong shape."""


class CheckpointError(ClafuseError):
    """A checkpoint cannot be read, or is not a plain mapping of tensors."""


class SpecError(ClafuseError):
    """An architecture spec is malformed or does not fit the weights."""


class DataError(ClafuseError):
    """A data source cannot be read or does not fit the model."""


class MapError(ClafuseError):
    """A map file is malformed or no longer matches its inputs."""


def printable(text: str) -> str:
    """``text`` on one line and safe to show on a terminal: runs of whitespace become one space and
    every other control or format character (escape sequences, bidi overrides, bytes that were not
    UTF-8 in a file name) is written as a ``\\xNN`` / ``\\uNNNN`` escape, so a file name can
    neither break the line nor drive the terminal."""
    out = []
    for char in " ".join(text.split()):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)

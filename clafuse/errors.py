"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""


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

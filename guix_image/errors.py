"""Errors the core raises; the CLI maps them to exit codes.

`InputError` means the user gave us something wrong (exit 2); `OperationError`
means a well-formed request failed while being carried out (exit 1).
"""


class GuixImageError(Exception):
    """Base class of every error the core reports to users."""

    exit_code = 1


class InputError(GuixImageError):
    """Bad input: a config, store path, archive or option that cannot be used."""

    exit_code = 2


class OperationError(GuixImageError):
    """A valid request that failed: I/O errors, files changing under us, cache faults."""

    exit_code = 1

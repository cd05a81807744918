"""Errors the core raises; the CLI maps them to exit codes.

`InputError` means the user gave us something wrong (exit 2); `OperationError`
means a well-formed request failed while being carried out (exit 1).
"""

from __future__ import annotations

import os


class GuixImageError(Exception):
    """Base class of every error the core reports to users."""

    exit_code = 1


class InputError(GuixImageError):
    """Bad input: a config, store path, archive or option that cannot be used."""

    exit_code = 2


class OperationError(GuixImageError):
    """A valid request that failed: I/O errors, files changing under us, cache faults."""

    exit_code = 1


class ArchiveError(InputError):
    """The archive is malformed, truncated, hostile or not what it claims."""

    offset: int | None = None  # where in the tar stream, when a tar reader found it


class FileChanged(OperationError):
    """A file changed between the scan that planned the archive and its copy."""


class SourceError(OperationError):
    """A file being copied into the stream could not be opened or read.

    Kept apart from the errors of the output (a closed pipe, a full disk),
    which pass through as they are.
    """

    def __init__(self, path: bytes | str, error: OSError) -> None:
        self.path = os.fsdecode(path)
        self.errno = error.errno
        super().__init__(f"cannot read {self.path}: {error.strerror}")

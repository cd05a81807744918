"""The tar format's constants and arithmetic, shared by the writer and the reader."""

from __future__ import annotations

from zlib import adler32

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)

REGTYPE = b"0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
PAX_HEADER = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"


def padding(size: int) -> int:
    """Bytes of zero padding that follow `size` bytes of member content."""
    return -size % BLOCK


def padded(size: int) -> int:
    return size + -size % BLOCK


def byte_sum(block: bytes) -> int:
    """Sum of the bytes of a 512-byte block, fast.

    Adler-32's low half is 1 + the byte sum modulo 65521; for 256 bytes the
    sum is at most 65280, so each half of the block gives its exact sum.
    """
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2

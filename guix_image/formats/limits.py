"""How much the readers take on: every bound on an archive from anywhere, in one place.

An archive over a bound is refused with one line (exit 2), before the work
it would cost is done where that can be known in advance.
"""

from __future__ import annotations

# JSON documents, as containers/image bounds them.
MAX_MANIFEST_SIZE = 1 << 20
MAX_CONFIG_SIZE = 4 << 20
MAX_CONFIGS_BYTES = 64 << 20  # all distinct configs of an archive together
MAX_STREAM_METADATA = 64 << 20  # JSON kept in memory while reading a stream

# The outer archive and what it lists.
MAX_MEMBERS = 100_000  # an image archive has a few members per layer
MAX_LINK_HOPS = 16  # links followed to reach a member
MAX_LAYERS = 1000  # per image; Docker refuses more than 125, overlayfs about 128
MAX_MANIFESTS = 1000  # manifests and indexes walked in an OCI layout; images listed
MAX_INDEX_DEPTH = 4  # indexes nested in indexes
# Manifests kept for the listings that repeat them: up to 1,000 distinct ones
# of up to 1 MiB each must not all stay in memory.
MANIFESTS_KEPT_BYTES = 8 << 20

# Layers.
MAX_ENTRIES = 2_000_000  # per layer, and in all; memory for names grows with it
# A layer inflating more than this many times its compressed size, beyond a
# small allowance, is treated as a decompression bomb. Real layers compress
# 2-10x; gzip cannot exceed about 1030x, zstd can go far beyond.
MAX_RATIO = 200
RATIO_ALLOWANCE = 64 << 20

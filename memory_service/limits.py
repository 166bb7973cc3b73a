"""The limits on every size in a StreamSpec: one home for the numbers.

Owns the promise that a stream the bank accepts is one it can build, store and reopen at a cost bounded by
these numbers (at most MAX_INDEXES_PER_STREAM empty indexes, well under a second to build), never by what a
caller typed: a spec past any of them is INVALID_ARGUMENT before anything is written (types.py checks them
in the dataclasses' constructors, so LocalMemory, the gRPC service and a stream record read back from disk
all apply the same rules). The same numbers are documented in README.md
("Limits") and in the comments of protos/memflow/v1/memory.proto; tests/unit/test_limits.py checks
that both say what this module says.

Why these values: they are far above every model the service is built for (Wan2.1-T2V-14B at 720p: 40
layers, 40 heads x 128, 3600 tokens per frame, 2.9 GB of bf16 K/V per frame), and far below what overflows
a C int inside faiss (dims), the 16-bit layer field of a payload key, or the 64 MiB gRPC message that
carries an entry's keys.
"""

from __future__ import annotations

MAX_STREAM_NAME_CHARS = 200
MAX_KEY_SPACES = 16  # per stream; a space's position is one byte of its LMDB key
MAX_KEY_SPACE_NAME_CHARS = 200
MAX_KEY_DIM = 1 << 20  # floats per key vector (faiss stores dims as a C int)
MAX_LAYERS = 1024  # KVLayout.layers and KeySpace.layers
MAX_INDEXES_PER_STREAM = 2048  # search indexes a stream builds: one per layer of a per-layer space, else one
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_TOKENS_PER_FRAME = 1 << 20
MAX_KEY_VALUES_PER_ENTRY = 1 << 22  # key floats of one entry over all its spaces and layers (16 MiB as float32)
MAX_KV_BYTES_PER_ENTRY = 4 << 30  # one entry's K/V payload: layers * 2 * tokens * heads * head_dim * itemsize
MAX_BUDGET_ENTRIES = 1 << 48
MAX_BUDGET_BYTES = 1 << 60
MAX_POLICY_CHARS = 1000
MAX_DEGRADE_STEPS = 8

# name -> value, for the README table and the test that the documentation matches
ALL_LIMITS = {name: value for name, value in dict(globals()).items() if name.startswith("MAX_")}

"""Attention over the paged KV cache: the backend contract, the CPU backend and the torch reference."""

from tokenforge.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    PrefillChunk,
    SeqLayout,
    rotate_and_write_kv,
    write_kv,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "PrefillChunk", "SeqLayout", "rotate_and_write_kv", "write_kv"]

"""Attention over the paged KV cache: metadata, the torch reference path and the compiled CPU kernel."""

from tokenforge.attention.base import AttentionMetadata, PrefillChunk, rotate_and_write_kv, write_kv
from tokenforge.attention.cpu import paged_attention

__all__ = ["AttentionMetadata", "PrefillChunk", "paged_attention", "rotate_and_write_kv", "write_kv"]

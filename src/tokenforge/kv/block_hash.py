"""Stable content keys for full KV blocks, the same in every process and on every machine.

A block's key is sha256 over its parent block's key and its token ids, so one key names one prefix: the
same tokens after a different prefix get a different key. The chain starts from a namespace digest (model
fingerprint, KV dtype, block size), so blocks of another model or layout never match, and a request's
optional cache salt enters the first block's key, so requests with different salts share nothing. Python's
`hash()` is salted per process, so it could not key a disk tier or a router's index; these keys can.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockKey = bytes  # a sha256 digest


def kv_namespace(model_fingerprint: str, kv_dtype: str, block_size: int) -> BlockKey:
    """The root of every key chain for one model, KV dtype and block size."""
    text = f"tokenforge-kv/1|{model_fingerprint}|{kv_dtype}|{block_size}"
    return hashlib.sha256(text.encode()).digest()


def block_key(parent: BlockKey, token_ids: Sequence[int], salt: str | None = None) -> BlockKey:
    """The key of a block holding `token_ids` after the block keyed `parent` (the namespace for the first
    block, which is also the only one a salt enters: later keys inherit it through the chain)."""
    digest = hashlib.sha256(parent)
    if salt is not None:
        digest.update(b"salt\x00" + salt.encode("utf-8", "surrogatepass") + b"\x00")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def prefix_keys(namespace: BlockKey, token_ids: Sequence[int], block_size: int, num_blocks: int | None = None,
                salt: str | None = None) -> list[BlockKey]:
    """Keys of the first `num_blocks` full blocks of token_ids (all full blocks by default): what an engine's
    KV manager computes for a request with these tokens, so a router or a KV transfer can name its blocks."""
    if num_blocks is None:
        num_blocks = len(token_ids) // block_size
    keys: list[BlockKey] = []
    for i in range(num_blocks):
        parent = keys[-1] if keys else namespace
        keys.append(block_key(parent, token_ids[i * block_size:(i + 1) * block_size], salt if i == 0 else None))
    return keys


# A salt may carry a tenant and a sub-salt ("tenant\x1fuser"): isolation uses the whole salt, quotas charge
# the tenant, so a tenant cannot escape its quota by varying the rest.
TENANT_SEP = "\x1f"
NO_OWNER = bytes(16)  # requests without a salt share one owner


def compose_salt(*parts: str | None) -> str | None:
    """One salt from a tenant and finer salts (user, the request's own); None when all are None."""
    present = [p for p in parts if p is not None]
    return TENANT_SEP.join(present) if present else None


def owner_of(salt: str | None) -> bytes:
    """The 16-byte tag lower tiers charge a salt's blocks to: a digest of its tenant, so disk files can carry
    it without revealing the salt."""
    if salt is None:
        return NO_OWNER
    tenant = salt.split(TENANT_SEP, 1)[0]
    return hashlib.sha256(b"tokenforge-owner\x00" + tenant.encode("utf-8", "surrogatepass")).digest()[:16]

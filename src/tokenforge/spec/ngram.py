"""Prompt lookup: draft the tokens that followed the last earlier occurrence of the text's ending.

No model is involved. Code, quotes and edits repeat their context a lot, so the tokens after the most
recent match of the longest suffix n-gram are often exactly what the model writes next.
"""

from __future__ import annotations

import numpy as np


def _continuations(tokens: np.ndarray, n_min: int, n_max: int, limit: int = 32) -> list[int]:
    """Where the text continued after each earlier match of its longest matching suffix (n_max..n_min
    tokens), most recent first, at most `limit`; empty when no suffix of n_min tokens occurred before.

    The search runs over the tokens' int32 bytes with bytes.rfind (C speed, no per-n window arrays): a
    hit counts only at a 4-byte boundary."""
    length = len(tokens)
    buf = tokens.astype(np.int32, copy=False).tobytes()
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = buf[4 * (length - n):]
        hits, end = [], 4 * (length - 1)  # matches end before the last token, so the suffix never matches itself
        while len(hits) < limit:
            pos = buf.rfind(pattern, 0, end)
            if pos < 0:
                break
            if pos % 4 == 0:
                hits.append(pos // 4 + n)
            end = pos + len(pattern) - 1
        if hits:
            return hits
    return []


def ngram_propose(token_ids: list[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest suffix of n_max..n_min tokens."""
    tokens = np.asarray(token_ids, dtype=np.int32)
    starts = _continuations(tokens, n_min, n_max, limit=1)
    return tokens[starts[0]:starts[0] + k].tolist() if starts else []


class NgramProposer:
    """Prompt lookup over the request's prompt and output so far."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def forget(self, req_id: str) -> None:
        pass  # no per-request state

    def propose(self, reqs, ks: list[int]) -> list[list[int]]:
        return [ngram_propose(r.all_token_ids, k, self.n_min, self.n_max) for r, k in zip(reqs, ks, strict=True)]

    def propose_tree(self, reqs, ks: list[int], width: int) -> list[tuple[list[int], list[int]]]:
        return [ngram_tree(r.all_token_ids, k, self.n_min, self.n_max, width) for r, k in zip(reqs, ks, strict=True)]


def ngram_tree(token_ids: list[int] | np.ndarray, budget: int, n_min: int, n_max: int, width: int,
               decay: float = 0.8, max_matches: int = 32) -> tuple[list[int], list[int]]:
    """A draft tree of at most `budget` nodes from every earlier match of the text's ending.

    Continuations of all matches (of the longest suffix that matches at all) are merged into a trie; each
    node scores the share of matches passing through it times decay**depth, a guess at the chance that
    verification reaches it, and the `budget` best nodes are kept (a node never outscores its parent, so
    they form a tree). Returns (tokens, parents) in breadth-first order; parent -1 is the known text.
    """
    tokens = np.asarray(token_ids, dtype=np.int32)
    starts = _continuations(tokens, n_min, n_max, max_matches)
    if not starts:
        return [], []
    # trie over continuations: key = token path; weight = matches through it (the latest counts double)
    weight: dict[tuple[int, ...], float] = {}
    for rank, start in enumerate(starts):
        cont = tokens[start:start + budget].tolist()
        for d in range(1, len(cont) + 1):
            weight[tuple(cont[:d])] = weight.get(tuple(cont[:d]), 0.0) + (2.0 if rank == 0 else 1.0)
    total = len(starts) + 1.0
    ranked = sorted(weight, key=lambda path: (-(weight[path] / total) * decay ** len(path), len(path)))
    chosen: set[tuple[int, ...]] = set()
    children: dict[tuple[int, ...], int] = {}
    for path in ranked:
        if len(chosen) == budget:
            break
        parent = path[:-1]
        if (parent and parent not in chosen) or children.get(parent, 0) >= width:
            continue
        chosen.add(path)
        children[parent] = children.get(parent, 0) + 1
    order = sorted(chosen, key=lambda path: (len(path), -weight[path]))
    index = {path: i for i, path in enumerate(order)}
    return [path[-1] for path in order], [index[path[:-1]] if len(path) > 1 else -1 for path in order]

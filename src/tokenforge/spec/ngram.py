"""Prompt lookup: draft the tokens that followed the last earlier occurrence of the text's ending.

No model is involved. Code, quotes and edits repeat their context a lot, so the tokens after the most
recent match of the longest suffix n-gram are often exactly what the model writes next.
"""

from __future__ import annotations

import heapq

import numpy as np

from tokenforge.engine.messages import Draft


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
    """Prompt lookup over the request's prompt and output so far: a chain, or with `tree_width` a tree."""

    costly = False  # a lookup costs microseconds: no reason to pause after a miss

    def __init__(self, n_min: int, n_max: int, tree_width: int | None = None):
        self.n_min, self.n_max = n_min, n_max
        self.tree = tree_width is not None
        self.tree_width = tree_width

    def forget(self, req_id: str) -> None:
        pass  # no per-request state

    def propose(self, reqs, ks: list[int]) -> list[Draft]:
        if self.tree:
            return [Draft(*ngram_tree(r.all_token_ids, k, self.n_min, self.n_max, self.tree_width))
                    for r, k in zip(reqs, ks, strict=True)]
        return [Draft(ngram_propose(r.all_token_ids, k, self.n_min, self.n_max)) for r, k in zip(reqs, ks, strict=True)]


def ngram_tree(token_ids: list[int] | np.ndarray, budget: int, n_min: int, n_max: int, width: int,
               decay: float = 0.8, max_matches: int = 32) -> tuple[list[int], list[int]]:
    """A draft tree of at most `budget` nodes from every earlier match of the text's ending.

    Continuations of all matches (of the longest suffix that matches at all) are merged into a trie; each
    node scores the share of matches passing through it times decay**depth, a guess at the chance that
    verification reaches it, and the `budget` best nodes are kept, at most `width` children per node. A
    node never outscores its parent, so growing the tree best-first from the root picks the same nodes as
    ranking them all. Returns (tokens, parents) in breadth-first order; parent -1 is the known text.
    """
    tokens = np.asarray(token_ids, dtype=np.int32)
    starts = _continuations(tokens, n_min, n_max, max_matches)
    if not starts:
        return [], []
    # trie: node 0 is the known text; the latest match counts double
    kids: list[dict[int, int]] = [{}]
    weight, depth, token, parent = [0.0], [0], [-1], [-1]
    for rank, start in enumerate(starts):
        node, w = 0, (2.0 if rank == 0 else 1.0)
        for t in tokens[start:start + budget].tolist():
            child = kids[node].get(t)
            if child is None:
                child = kids[node][t] = len(kids)
                kids.append({})
                weight.append(0.0)
                depth.append(depth[node] + 1)
                token.append(t)
                parent.append(node)
            weight[child] += w
            node = child

    def entry(n: int) -> tuple[float, int, int]:
        return -weight[n] * decay ** depth[n], depth[n], n  # ties: shallower, then first seen

    frontier = [entry(c) for c in kids[0].values()]
    heapq.heapify(frontier)
    chosen, taken = [], [0] * len(kids)
    while frontier and len(chosen) < budget:
        n = heapq.heappop(frontier)[2]
        if taken[parent[n]] >= width:
            continue
        taken[parent[n]] += 1
        chosen.append(n)
        for c in kids[n].values():
            heapq.heappush(frontier, entry(c))
    chosen.sort(key=lambda n: (depth[n], -weight[n], n))
    index = {n: i for i, n in enumerate(chosen)}
    return [token[n] for n in chosen], [index.get(parent[n], -1) for n in chosen]

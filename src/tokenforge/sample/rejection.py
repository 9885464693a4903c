"""Verifying drafts: the rows of a drafted request hold the target's logits after each draft prefix.

Row i of a request with draft d (k tokens) is the target's prediction after the known tokens plus d[:i],
so it is processed exactly as plain decoding would process it at that point (penalties and min_tokens
see the output extended by d[:i]). Then, position by position:
- greedy: d[i] is accepted while it equals the processed argmax; the first mismatch is replaced by the
  argmax, and a fully accepted draft earns the argmax of row k as a bonus token;
- sampled: d[i] is accepted with probability min(1, p(d[i]) / q(d[i])), where p is the target's processed
  distribution and q the proposer's; on rejection a token is drawn from max(p - q, 0), renormalized.
  This is the standard speculative-sampling rule: each emitted token is distributed exactly as p.
  Proposers without probabilities (prompt lookup) propose deterministically, i.e. q is a point mass.
Random numbers come from the request's own generator when it is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenforge.sample.sampler import (
    Sampler,
    SamplingState,
    _apply_min_p,
    _apply_top_k_top_p,
    _exponentials,
    _logprobs,
)


@dataclass
class DraftGroup:
    """One request's rows: its sampling state and the draft its rows verify (k tokens -> k + 1 rows)."""

    state: SamplingState
    draft: list[int]
    draft_probs: torch.Tensor | None = None  # [k, vocab] proposer distributions; None: deterministic draft


def verify(sampler: Sampler, logits: torch.Tensor, groups: list[DraftGroup]) -> list[tuple[list[int], list]]:
    """Per group: the emitted tokens (accepted drafts + one from the target) and their logprobs (or Nones)."""
    logits = logits.float()
    if all(_plain_greedy(sampler, g.state) for g in groups):  # the common case: no per-row states needed
        targets, out, row = logits.argmax(dim=-1).tolist(), [], 0
        for g in groups:
            tokens = _accept_greedy(g.draft, targets[row:row + len(g.draft) + 1])
            out.append((tokens, [None] * len(tokens)))
            row += len(g.draft) + 1
        return out
    states = [_row_state(g.state, g.draft[:i]) for g in groups for i in range(len(g.draft) + 1)]
    targets, probs = _targets(sampler, logits, states)
    results, emitted_rows, emitted_tokens = [], [], []
    row = 0
    for g in groups:
        k = len(g.draft)
        if g.state.params.greedy:
            tokens = _accept_greedy(g.draft, targets[row:row + k + 1])
        else:
            tokens = _accept_sampled(g, probs[row:row + k + 1])
        emitted_rows.extend(range(row, row + len(tokens)))
        emitted_tokens.extend(tokens)
        results.append(tokens)
        row += k + 1
    lps = _logprobs(logits[emitted_rows], [states[r] for r in emitted_rows], torch.tensor(emitted_tokens))
    out, pos = [], 0
    for tokens in results:
        out.append((tokens, lps[pos:pos + len(tokens)]))
        pos += len(tokens)
    return out


def _plain_greedy(sampler: Sampler, state: SamplingState) -> bool:
    """Greedy with nothing that changes the argmax (penalties, min_tokens) and no logprobs: the rows' raw
    argmax is all verification needs. Drafting only lengthens the output, so min_tokens cannot start
    to block once the known output is long enough."""
    p = state.params
    return p.greedy and p.logprobs is None and not p.uses_penalties and not sampler.blocked_token_ids(state)


def _targets(sampler: Sampler, logits: torch.Tensor,
             states: list[SamplingState]) -> tuple[list[int], torch.Tensor | None]:
    """Per row, the processed argmax (penalties and min_tokens applied, as plain decoding would), and the
    processed distributions when any row samples (None when all are greedy)."""
    if all(s.params.greedy and not s.params.uses_penalties and not sampler.blocked_token_ids(s) for s in states):
        return logits.argmax(dim=-1).tolist(), None
    processed = logits.clone()
    sampler.process(processed, states)
    targets = processed.argmax(dim=-1).tolist()
    if all(s.params.greedy for s in states):
        return targets, None
    return targets, _target_probs(processed, states)


def _row_state(state: SamplingState, drafted: list[int]) -> SamplingState:
    if not drafted:
        return state
    return SamplingState(state.params, state.generator, state.prompt_token_ids, state.output_token_ids + drafted)


def _target_probs(processed: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The distribution plain sampling draws from, per row (rows of greedy requests are left as logits)."""
    rows = [j for j, s in enumerate(states) if not s.params.greedy]
    if not rows:
        return processed
    idx = torch.tensor(rows)
    sub = processed.index_select(0, idx)
    params = [states[j].params for j in rows]
    sub.div_(torch.tensor([p.temperature for p in params]).unsqueeze(1))
    _apply_top_k_top_p(sub, params)
    _apply_min_p(sub, params)
    out = processed.clone()
    out.index_copy_(0, idx, sub.softmax(dim=-1))
    return out


def _accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    for i, token in enumerate(draft):
        if token != targets[i]:
            return draft[:i] + [targets[i]]
    return draft + [targets[len(draft)]]


def _accept_sampled(group: DraftGroup, probs: torch.Tensor) -> list[int]:
    gen = group.state.generator
    for i, token in enumerate(group.draft):
        p = probs[i]
        q_token = 1.0 if group.draft_probs is None else float(group.draft_probs[i, token])
        u = float(torch.rand((), generator=gen)) if gen is not None else float(torch.rand(()))
        if u * q_token < float(p[token]):  # accept with probability min(1, p/q)
            continue
        if group.draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - group.draft_probs[i]).clamp_(min=0.0)
        return group.draft[:i] + [_draw(residual, group.state)]
    return group.draft + [_draw(probs[len(group.draft)].clone(), group.state)]


def _draw(weights: torch.Tensor, state: SamplingState) -> int:
    """One token with probability proportional to `weights` (need not sum to 1)."""
    row = weights.unsqueeze(0)
    return int(row.div_(_exponentials(row.shape, [state], row.device)).argmax(dim=-1))



def tree_paths(parents: list[int]) -> list[list[int]]:
    """For each node, the node indices from the root's child down to the node itself."""
    paths: list[list[int]] = []
    for j, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else []) + [j])
    return paths


def verify_tree(sampler: Sampler, logits: torch.Tensor, state: SamplingState, tokens: list[int],
                parents: list[int]) -> tuple[list[int], list[int], list]:
    """Walk a draft tree from the root (row 0) down the children the target accepts.

    Row j + 1 holds the target's prediction after node j. Greedy: follow the child equal to the processed
    argmax. Sampled: try the children in order, each accepted with its (renormalized) target probability;
    a rejected child's token is removed from the distribution before the next one is tried, and when
    all are rejected the token is drawn from what is left. With point-mass drafts this is exact: each
    emitted token follows the target distribution. Returns (emitted tokens, accepted nodes, logprobs).
    """
    logits = logits.float()
    kids: dict[int, list[int]] = {}
    for j, parent in enumerate(parents):
        kids.setdefault(parent, []).append(j)
    if _plain_greedy(sampler, state):  # no per-row states needed: every row's processed argmax is its raw one
        emitted, accepted = _walk_greedy(kids, tokens, logits.argmax(dim=-1).tolist())
        return emitted, accepted, [None] * len(emitted)
    states = [state] + [_row_state(state, [tokens[n] for n in path]) for path in tree_paths(parents)]
    targets, probs = _targets(sampler, logits, states)  # probs is None for a greedy request
    node, accepted, emitted = -1, [], []
    while True:
        row = node + 1
        children = kids.get(node, [])
        if probs is None:
            nxt = next((c for c in children if tokens[c] == targets[row]), None)
            if nxt is None:
                emitted.append(targets[row])
                break
        else:
            nxt, p = None, probs[row].clone()
            for c in children:
                mass = float(p.sum())
                u = float(torch.rand((), generator=state.generator)) if state.generator else float(torch.rand(()))
                if u * mass < float(p[tokens[c]]):
                    nxt = c
                    break
                p[tokens[c]] = 0.0
            if nxt is None:
                emitted.append(_draw(p, state))
                break
        accepted.append(nxt)
        emitted.append(tokens[nxt])
        node = nxt
    rows = [0] + [n + 1 for n in accepted]
    lps = _logprobs(logits[rows], [states[r] for r in rows], torch.tensor(emitted))
    return emitted, accepted, lps


def _walk_greedy(kids: dict[int, list[int]], tokens: list[int], targets: list[int]) -> tuple[list[int], list[int]]:
    """Follow the child equal to each row's argmax; (emitted tokens, accepted nodes)."""
    node, accepted, emitted = -1, [], []
    while True:
        nxt = next((c for c in kids.get(node, []) if tokens[c] == targets[node + 1]), None)
        if nxt is None:
            return emitted + [targets[node + 1]], accepted
        accepted.append(nxt)
        emitted.append(tokens[nxt])
        node = nxt

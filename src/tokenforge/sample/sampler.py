"""Turns one row of logits per request into the next token, plus the logprobs the request asked for.

Order of work on a row: logprobs of the raw logits (as vLLM v1 reports them); repetition, frequency and
presence penalties; min_tokens masking of stop tokens; then argmax for greedy rows, or temperature,
top-k, top-p, min-p and a draw for the others.

Reproducibility contract: a seeded request draws its random numbers only from its own generator, so
its tokens do not depend on which requests share the batch or in what order. Unseeded rows use the
global default RNG.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tokenforge.sampling_params import SamplingParams

# Top-p looks first at this many best tokens per row (a full sort of a 50k vocabulary is costly on CPU);
# rows whose nucleus is wider are sorted in full.
_TOP_P_CANDIDATES = 1024
_NEG_INF = float("-inf")


@dataclass
class SamplingState:
    """One row of the batch, built by the model runner. The token lists belong to the request: read only."""

    params: SamplingParams
    generator: torch.Generator | None  # seeded from params.seed; None when unseeded
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 + the number of tokens strictly more likely under the raw distribution
    top_logprobs: list[tuple[int, float]]  # the params.logprobs most likely (id, logprob), best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


class Sampler:
    """Picks one token per row. `eos_token_ids` are needed to enforce min_tokens."""

    def __init__(self, eos_token_ids: Iterable[int] = ()):
        self.eos_token_ids = frozenset(eos_token_ids)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [num_states={len(states)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()
        # Rows that are plain greedy (the common case) are served by one argmax over the whole batch;
        # only the others are copied out and processed.
        work = [i for i, s in enumerate(states)
                if not s.params.greedy or s.params.uses_penalties or self.blocked_token_ids(s)]
        if not work:
            token_ids = logits.argmax(dim=-1)
        elif len(work) == len(states):
            token_ids = self._pick(logits.clone(), states)
        else:
            token_ids = logits.argmax(dim=-1)
            work_rows = torch.tensor(work, device=logits.device)
            picked = self._pick(logits.index_select(0, work_rows), [states[i] for i in work])
            token_ids.index_copy_(0, work_rows, picked)
        return SamplerOutput(token_ids.tolist(), _logprobs(logits, states, token_ids))

    def blocked_token_ids(self, state: SamplingState) -> list[int]:
        """Tokens that would end the request while it is still short of min_tokens."""
        params = state.params
        if len(state.output_token_ids) >= params.min_tokens:
            return []
        blocked = set(params.stop_token_ids)
        if not params.ignore_eos:
            blocked |= self.eos_token_ids
        return sorted(blocked)

    def process(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """In place: penalties, then min_tokens masking of the tokens that would end a request too early."""
        apply_penalties(logits, states)
        vocab_size = logits.shape[1]
        for j, state in enumerate(states):
            blocked = [t for t in self.blocked_token_ids(state) if t < vocab_size]
            if blocked:
                logits[j, blocked] = _NEG_INF

    def _pick(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Token per row for rows that need more than an argmax; `logits` is a private copy."""
        self.process(logits, states)
        token_ids = logits.argmax(dim=-1)
        sampled = [j for j, s in enumerate(states) if not s.params.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            drawn = _sample(logits.index_select(0, rows), [states[j] for j in sampled])
            token_ids.index_copy_(0, rows, drawn)
        return token_ids


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """In place: repetition penalty as in HF (over prompt and output), then OpenAI frequency and
    presence penalties (over the output only). Touches only the logits of tokens seen, never the whole
    vocabulary, so the cost follows the sequence lengths."""
    device = logits.device
    repeat = [j for j, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if repeat:
        rows, ids = _flatten([(j, states[j].prompt_token_ids + states[j].output_token_ids) for j in repeat],
                             device)
        rep = torch.tensor([s.params.repetition_penalty for s in states], device=device)[rows]
        seen = logits[rows, ids]
        # A token seen twice is written twice with the same value, computed from the unpenalized logit.
        logits[rows, ids] = torch.where(seen > 0, seen / rep, seen * rep)
    additive = [j for j, s in enumerate(states)
                if s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0]
    if additive:
        rows, ids = _flatten([(j, states[j].output_token_ids) for j in additive], device)
        freq = torch.tensor([s.params.frequency_penalty for s in states], device=device)
        logits.index_put_((rows, ids), -freq[rows], accumulate=True)  # once per occurrence
        vocab_size = logits.shape[1]
        distinct = torch.unique(rows * vocab_size + ids)
        rows, ids = distinct // vocab_size, distinct % vocab_size
        presence = torch.tensor([s.params.presence_penalty for s in states], device=device)
        logits.index_put_((rows, ids), -presence[rows], accumulate=True)  # once per distinct token


def _flatten(rows_and_ids: list[tuple[int, list[int]]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row, token id) pairs for some rows' token lists, as two long tensors."""
    lengths = torch.tensor([len(ids) for _, ids in rows_and_ids], dtype=torch.long)
    rows = torch.repeat_interleave(torch.tensor([row for row, _ in rows_and_ids], dtype=torch.long), lengths)
    ids = torch.cat([torch.tensor(ids, dtype=torch.long) for _, ids in rows_and_ids])
    return rows.to(device), ids.to(device)


def _sample(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row; `logits` is modified in place."""
    device = logits.device
    params = [s.params for s in states]
    logits.div_(torch.tensor([p.temperature for p in params], device=device).unsqueeze(1))
    _apply_top_k_top_p(logits, params)
    _apply_min_p(logits, params)
    probs = logits.softmax(dim=-1)
    # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks token i with probability p_i, using
    # exactly `vocab` draws from the row's own generator.
    return probs.div_(_exponentials(probs.shape, states, device)).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place: keep each row's k best tokens, then the fewest of those whose probability, renormalized
    over the k, reaches top_p."""
    vocab_size = logits.shape[1]
    top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    rows = [j for j, p in enumerate(params) if top_k[j] < vocab_size or p.top_p < 1.0]
    if not rows:
        return
    device = logits.device
    row_ids = torch.tensor(rows, device=device)
    sub = logits.index_select(0, row_ids)
    k = torch.tensor([top_k[j] for j in rows], device=device).unsqueeze(1)
    # A disabled top_p must not cut the tail through cumsum rounding, so give it an unreachable bound.
    p = torch.tensor([params[j].top_p if params[j].top_p < 1.0 else 2.0 for j in rows],
                     device=device).unsqueeze(1)
    without_top_k = any(top_k[j] == vocab_size for j in rows)
    full_lse = sub.logsumexp(dim=-1, keepdim=True) if without_top_k else None
    num_candidates = min(vocab_size, max(top_k[j] if top_k[j] < vocab_size else _TOP_P_CANDIDATES
                                         for j in rows))
    values, ids = sub.topk(num_candidates, dim=-1)
    keep, complete = _nucleus(values, full_lse, k, p, vocab_size)
    restricted = torch.full_like(sub, _NEG_INF).scatter_(1, ids, values.masked_fill_(~keep, _NEG_INF))
    if not bool(complete.all()):
        wide = (~complete).nonzero().squeeze(1)
        values, ids = sub.index_select(0, wide).sort(dim=-1, descending=True)
        keep, _ = _nucleus(values, None, k[wide], p[wide], vocab_size)
        restricted.index_copy_(0, wide, values.masked_fill_(~keep, _NEG_INF).scatter(1, ids, values))
    logits.index_copy_(0, row_ids, restricted)


def _nucleus(values: torch.Tensor, full_lse: torch.Tensor | None, k: torch.Tensor, p: torch.Tensor,
             vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Given each row's best logits `values`, sorted descending: which of them top-k then top-p keep, and
    whether that is the row's whole answer (its cut falls among `values`). `full_lse` is logsumexp over
    the whole row, needed for rows without top-k unless `values` is the whole row."""
    num_values = values.shape[1]
    in_top_k = torch.arange(num_values, device=values.device).unsqueeze(0) < k
    lse = values.masked_fill(~in_top_k, _NEG_INF).logsumexp(dim=-1, keepdim=True)
    if full_lse is not None:
        lse = torch.where(k < vocab_size, lse, full_lse)
    probs = (values - lse).exp()
    cumulative = probs.cumsum(dim=-1)
    keep = in_top_k & (cumulative - probs < p)
    complete = (k <= num_values) | (cumulative[:, -1:] >= p)
    return keep, complete.squeeze(1)


def _apply_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
    if not rows:
        return
    row_ids = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, row_ids)
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); no softmax needed.
    log_min_p = torch.tensor([params[j].min_p for j in rows], device=logits.device).log().unsqueeze(1)
    threshold = sub.max(dim=-1, keepdim=True).values + log_min_p
    logits.index_copy_(0, row_ids, sub.masked_fill_(sub < threshold, _NEG_INF))


def _exponentials(shape: torch.Size, states: list[SamplingState], device: torch.device) -> torch.Tensor:
    """Exp(1) noise as -log(U), several times cheaper than exponential_ on CPU. The clamp keeps q > 0
    should U be exactly 1: a zero divisor would turn a zero probability into NaN, which argmax ranks first."""
    u = torch.empty(shape, device=device)
    if all(s.generator is None for s in states):
        u.uniform_()
    else:
        for j, state in enumerate(states):
            _fill_uniform(u[j], state.generator)
    return u.log_().neg_().clamp_(min=torch.finfo(u.dtype).tiny)


def _fill_uniform(row: torch.Tensor, generator: torch.Generator | None) -> None:
    if generator is None:
        row.uniform_()
    elif generator.device == row.device:
        row.uniform_(generator=generator)
    else:
        row.copy_(torch.empty(row.shape, device=generator.device).uniform_(generator=generator))


def _logprobs(logits: torch.Tensor, states: list[SamplingState],
              token_ids: torch.Tensor) -> list[TokenLogprobs | None]:
    """Logprobs of the chosen tokens and the top alternatives, under the raw (unprocessed) logits."""
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(states)
    if not rows:
        return result
    row_ids = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, row_ids), dim=-1)
    chosen = token_ids.index_select(0, row_ids).unsqueeze(1)
    chosen_logprobs = logprobs.gather(1, chosen)
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1
    num_top = max(states[i].params.logprobs for i in rows)
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    chosen_list, chosen_lp = chosen.squeeze(1).tolist(), chosen_logprobs.squeeze(1).tolist()
    rank_list, top_values, top_ids = ranks.tolist(), top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = states[i].params.logprobs
        top = list(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        result[i] = TokenLogprobs(chosen_list[j], chosen_lp[j], rank_list[j], top)
    return result

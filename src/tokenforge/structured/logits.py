"""The logits-processing step for output constraints: one call applies, in place and batched over rows,
`logit_bias`, `allowed_token_ids`, `bad_words` and grammar bitmasks, before the sampler sees the logits.

Order: the bias is added first (it is a preference), then the bans: tokens outside `allowed_token_ids`, the
last token of a bad word whose other tokens the output ends with, and tokens the grammar forbids. A ban
is -inf, so greedy and sampled rows, logprobs and the rejection sampler all see the same distribution.

The grammar always holds: if `allowed_token_ids` and `bad_words` together with the grammar would leave a row
no token at all, those two give way for that row (it keeps the bias and the grammar mask), since a row of
-inf has no distribution to sample from.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenforge import kernels

_NEG_INF = float("-inf")


@dataclass
class RowConstraints:
    """What constrains one row of logits. With a speculative draft, each verified position is a row:
    the same request's bias, allowed ids and bad words, its own bitmask row, and `output_token_ids`
    extended by the draft tokens before that position."""

    bitmask_row: int | None = None  # this row's row in the step's grammar bitmask; None: no grammar
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: Sequence[int] | None = None
    bad_words_token_ids: Sequence[Sequence[int]] = field(default_factory=list)  # from `bad_words_token_ids`
    output_token_ids: Sequence[int] = field(default_factory=list)  # output so far, read only

    @property
    def has_bans(self) -> bool:
        """Bans that give way to the grammar when together they leave nothing."""
        return self.allowed_token_ids is not None or bool(self.bad_words_token_ids)


def apply_constraints(logits: torch.Tensor, rows: Sequence[RowConstraints | None],
                      bitmask: torch.Tensor | None = None) -> None:
    """Apply every row's constraints to `logits` [len(rows), vocab] (float) in place. `bitmask` is the
    step's int32 grammar bitmask [*, ceil(vocab / 32)] that rows' `bitmask_row` index into. Token ids at or
    beyond the logits' width are ignored (they cannot be sampled anyway)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
    if not any(rows):
        return
    vocab_size = logits.shape[1]
    _add_bias(logits, rows, vocab_size)
    banned = [i for i, r in enumerate(rows) if r is not None and r.has_bans]
    saved = logits.index_select(0, torch.tensor(banned)) if banned else None
    _keep_allowed(logits, rows, vocab_size)
    _ban_bad_words(logits, rows, vocab_size)
    _apply_bitmask(logits, rows, bitmask)
    if banned:
        _give_way(logits, rows, bitmask, banned, saved)


def _add_bias(logits: torch.Tensor, rows: Sequence[RowConstraints | None], vocab_size: int) -> None:
    pairs = [(i, t, b) for i, r in enumerate(rows) if r is not None and r.logit_bias
             for t, b in r.logit_bias.items() if t < vocab_size]
    if pairs:
        row_ids, token_ids, biases = zip(*pairs)
        logits.index_put_((torch.tensor(row_ids), torch.tensor(token_ids)),
                          torch.tensor(biases, dtype=logits.dtype), accumulate=True)


def _keep_allowed(logits: torch.Tensor, rows: Sequence[RowConstraints | None], vocab_size: int) -> None:
    which = [i for i, r in enumerate(rows) if r is not None and r.allowed_token_ids is not None]
    if not which:
        return
    keep = torch.zeros(len(which), vocab_size, dtype=torch.bool)
    for k, i in enumerate(which):
        ids = torch.tensor(rows[i].allowed_token_ids, dtype=torch.long)
        keep[k, ids[ids < vocab_size]] = True
    _fill_rows(logits, which, keep.logical_not_())


def _ban_bad_words(logits: torch.Tensor, rows: Sequence[RowConstraints | None], vocab_size: int) -> None:
    pairs = [(i, t) for i, r in enumerate(rows) if r is not None
             for t in _banned_by_bad_words(r.bad_words_token_ids, r.output_token_ids) if t < vocab_size]
    if pairs:
        row_ids, token_ids = zip(*pairs)
        logits[torch.tensor(row_ids), torch.tensor(token_ids)] = _NEG_INF


def _banned_by_bad_words(bad_words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """vLLM's rule: a one-token bad word is always banned; a longer one bans its last token when the
    output ends with all its other tokens."""
    banned = []
    for word in bad_words:
        prefix_len = len(word) - 1
        if prefix_len == 0 or (len(output) >= prefix_len and list(output[-prefix_len:]) == list(word[:-1])):
            banned.append(word[-1])
    return banned


def _apply_bitmask(logits: torch.Tensor, rows: Sequence[RowConstraints | None], bitmask: torch.Tensor | None) -> None:
    which = [i for i, r in enumerate(rows) if r is not None and r.bitmask_row is not None]
    if not which:
        return
    if bitmask is None:
        raise ValueError("rows name bitmask rows but no bitmask was given")
    if _bitmask_kernel(logits, bitmask):  # one pass in C per row (torch's unpack + fill: ~0.27 ms per row)
        for i in which:
            kernels.apply_bitmask(logits[i], bitmask[rows[i].bitmask_row])
        return
    words = bitmask.index_select(0, torch.tensor([rows[i].bitmask_row for i in which]))
    _fill_rows(logits, which, unpack_bitmask(words.bitwise_not_(), logits.shape[1]))  # the banned bits


def _bitmask_kernel(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    return (kernels.ACTIVE is not None and logits.is_cpu and logits.dtype == torch.float32 and logits.is_contiguous()
            and bitmask.is_cpu and bitmask.dtype == torch.int32 and bitmask.is_contiguous()
            and bitmask.shape[1] * 32 >= logits.shape[1])


def _give_way(logits: torch.Tensor, rows: Sequence[RowConstraints | None], bitmask: torch.Tensor | None,
              banned: list[int], saved: torch.Tensor) -> None:
    """Rows left without any finite logit go back to their biased logits plus the grammar mask only."""
    dead = torch.isneginf(logits.index_select(0, torch.tensor(banned))).all(dim=1).nonzero().squeeze(1).tolist()
    if not dead:
        return
    dead_rows = [banned[k] for k in dead]
    logits.index_copy_(0, torch.tensor(dead_rows), saved.index_select(0, torch.tensor(dead)))
    only_grammar = [RowConstraints(bitmask_row=rows[i].bitmask_row) if i in dead_rows else None
                    for i in range(len(rows))]
    _apply_bitmask(logits, only_grammar, bitmask)


def _fill_rows(logits: torch.Tensor, which: list[int], banned: torch.Tensor) -> None:
    """logits[which] = -inf where `banned` [len(which), vocab] is True; in place on the whole batch when
    `which` is every row, the common case of an all-constrained batch."""
    if len(which) == logits.shape[0]:
        logits.masked_fill_(banned, _NEG_INF)
        return
    index = torch.tensor(which)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(banned, _NEG_INF))


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask rows [n, ceil(vocab / 32)] -> bool [n, vocab_size], True where the bit is set (the
    token is allowed; unpack the inverted words for the banned ones). Bit t % 32 of word t // 32 is token
    t, so on a little-endian machine the words' bytes, unpacked least-significant bit first, are the tokens
    in order: numpy does it in one C loop, and the result is contiguous and ready for `masked_fill_`."""
    assert sys.byteorder == "little", "the bitmask layout assumes a little-endian CPU"
    bits = np.unpackbits(words.contiguous().numpy().view(np.uint8), axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


def bad_words_token_ids(bad_words: Sequence[str], tokenizer) -> list[list[int]]:
    """Each bad word as token ids, as written at the start of the text and after a space (byte-level BPE
    spells the two differently); computed once per request. `tokenizer` has `encode(text,
    add_special_tokens=...)` (our TokenizerWrapper, or a `tokenizers.Tokenizer` through `.ids`)."""
    result: list[list[int]] = []
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            ids = list(getattr(ids, "ids", ids))
            if ids and ids not in result:
                result.append(ids)
    return result

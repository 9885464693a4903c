"""One request's position in its grammar: `GrammarMatcher`, a thin, documented wrapper over llguidance's
`LLMatcher` with exactly the operations the engine needs.

llguidance puts a matcher that consumes a forbidden token into an error state it never leaves (not even by
rollback), so nothing here consumes a token without checking it first: a rejected token leaves the state as
it was and is reported instead.
"""

from __future__ import annotations

import torch

ALL_ALLOWED = -1  # an int32 bitmask word with every bit set


class GrammarMatcher:
    """The grammar state of one request, made by `CompiledGrammar.matcher()`.

    The engine's contract, step by step:

    1. Before sampling, write this request's allowed-token bits into its row(s) of the step's int32 bitmask
       `[num_rows, ceil(vocab_size / 32)]` (bit `t % 32` of word `t // 32` set: token t allowed):
       - `fill_bitmask(bitmask, row)` for a plain decode row;
       - `fill_draft_bitmasks(bitmask, row, draft_token_ids, draft_parents)` for a speculative step: row
         `row` is the mask after the request's known tokens, row `row + 1 + j` the mask after draft node j
         (its ancestors and itself). A node the grammar rejects, or one below it, gets an all-allowed row:
         verification never reads it, because the rejected node's own token is forbidden in its parent's row
         and so is never accepted. The matcher ends where it started.
       `structured.logits.apply_constraints` then sets forbidden logits to -inf, greedy and sampled rows
       alike; the sampler and the rejection sampler run unchanged.
    2. After sampling, `accept_tokens(ids)` with exactly the tokens the request keeps (one, or the accepted
       draft prefix plus the bonus token), EOS included if sampled. It returns False, and changes nothing,
       if the grammar rejects one: that only happens when a mask was not applied (an engine bug).
    3. If `is_terminated` after accepting, the grammar is complete and allows nothing but EOS: end the
       request as stopped (finish_reason "stop"), as an EOS would. `max_tokens` and stop strings end a
       constrained request as they end any other.
    4. `rollback(n)` undoes the last n accepted tokens; `reset()` returns to the start (a request restarted
       from scratch). Preemption that keeps the output tokens and only recomputes their KV needs neither.

    `error` is set if llguidance hit an internal limit (a grammar whose per-token work exceeds its fuel);
    the mask then allows only EOS so the request ends instead of producing invalid output.

    Not thread-safe: one thread at a time (the bitmask worker during a step, the engine between steps).
    """

    def __init__(self, ll_matcher, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.num_accepted = 0  # tokens accepted since the start, so rollback can be bounded

    # ---- state -------------------------------------------------------------------------------------
    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and no token but EOS can follow."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS may come now, though more may also follow)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() or None

    # ---- masks -------------------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits for the current state into `bitmask[row]` (int32, CPU, contiguous)."""
        address, num_bytes = _row_address(bitmask, row)  # no tensor view per row: this runs every step
        if self._m.is_error():
            self._eos_only(bitmask[row])
            return
        self._m.unsafe_compute_mask_ptr(address, num_bytes)

    def _eos_only(self, target: torch.Tensor) -> None:
        target.zero_()
        for t in self.eos_token_ids:
            target[t // 32] |= _bit(t % 32)

    def fill_draft_bitmasks(self, bitmask: torch.Tensor, row: int, draft_token_ids: list[int],
                            draft_parents: list[int] | None = None) -> int:
        """Fill rows `row .. row + len(draft)` for a draft (a chain, or a tree whose node j has parent
        `draft_parents[j]`, -1 for the known text, parents before children). Returns how many leading
        tokens of the chain (for a tree: nodes) the grammar accepts. The state is unchanged afterwards."""
        self.fill_bitmask(bitmask, row)
        parents = list(range(-1, len(draft_token_ids) - 1)) if draft_parents is None else draft_parents
        path: list[int] = []  # draft node indices consumed right now, root first
        num_valid = 0
        for j, parent in enumerate(parents):
            while path and path[-1] != parent:  # back up to the parent: rollback is cheap in llguidance
                self._m.rollback(1)
                path.pop()
            if (parent == -1 or path) and self._try_consume(draft_token_ids[j]):
                path.append(j)
                num_valid += 1
                self.fill_bitmask(bitmask, row + 1 + j)
            else:  # j or an ancestor is rejected: its row is never read by verification
                _row(bitmask, row + 1 + j).fill_(ALL_ALLOWED)
        if path:
            self._m.rollback(len(path))
        return num_valid

    # ---- advancing ---------------------------------------------------------------------------------
    def validate_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens the grammar would accept from the current state (no state change)."""
        return self._m.validate_tokens(list(token_ids))

    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over `token_ids`. All or nothing: False (state unchanged) if the grammar rejects one.
        An EOS right where the grammar has terminated is accepted (llguidance's mask allows it there but
        will not consume it), and ends what is read: the request ends there."""
        token_ids = list(token_ids)
        num = self._m.try_consume_tokens(token_ids)
        if num < len(token_ids) and not (token_ids[num] in self.eos_token_ids and self._m.is_stopped()):
            if num:
                self._m.rollback(num)
            return False
        self.num_accepted += num
        return True

    def _try_consume(self, token_id: int) -> bool:
        return self._m.try_consume_tokens([token_id]) == 1

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.num_accepted} were accepted")
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"llguidance refused to roll back {num_tokens} tokens: {self._m.get_error()}")
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        """Back to the start state, as if nothing had been accepted."""
        self._m.reset()
        self.num_accepted = 0


def _row(bitmask: torch.Tensor, row: int) -> torch.Tensor:
    _row_address(bitmask, row)
    return bitmask[row]


def _row_address(bitmask: torch.Tensor, row: int) -> tuple[int, int]:
    """Where row `row` of the bitmask starts in memory and its size in bytes, after checking the layout
    llguidance writes (it is told only an address)."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
        raise ValueError(f"the bitmask must be a 2-D int32 CPU tensor, got {bitmask.dtype} {tuple(bitmask.shape)} "
                         f"on {bitmask.device}")
    if bitmask.stride(1) != 1:
        raise ValueError("the bitmask's rows must be contiguous")
    if not 0 <= row < bitmask.shape[0]:
        raise IndexError(f"bitmask row {row} is outside its {bitmask.shape[0]} rows")
    return bitmask.data_ptr() + row * bitmask.stride(0) * 4, bitmask.shape[1] * 4


def _bit(position: int) -> int:
    """The int32 word with only bit `position` set (bit 31 is the sign bit)."""
    return -(2**31) if position == 31 else 1 << position

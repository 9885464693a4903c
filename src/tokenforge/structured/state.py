"""The glue the engine integration needs: `RequestConstraints`, one request's constraint state made once at
admission, and `plan_rows`, which lays a step's sampling rows out for the bitmask worker and the logits step.

Per step, in the runner (rows in the order of the logits the LM head produces: for each sampling request
one row, or 1 + len(draft) rows for a speculative one):

    jobs, rows = plan_rows(entries)               # entries: (constraints or None, output ids, draft, parents)
    handle = worker.submit(jobs)                  # before the forward pass: masks overlap it
    logits = model(...)
    apply_constraints(logits, rows, handle.wait().bitmask)
    ... sample / verify as before ...
    constraints.accept(kept_token_ids)           # per request, with the tokens it keeps
    if constraints.is_terminated: finish the request as stopped
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenforge.sampling_params import SamplingParams
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.structured.logits import RowConstraints, bad_words_token_ids
from tokenforge.structured.matcher import GrammarMatcher
from tokenforge.structured.worker import MaskJob


@dataclass
class RequestConstraints:
    """What constrains one request's logits: its grammar state (None without `structured_outputs`), its
    bias, allowed ids and bad words as token ids. Owned by the engine's request; the matcher advances."""

    matcher: GrammarMatcher | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_params(cls, params: SamplingParams, compiler: GrammarCompiler, tokenizer) -> RequestConstraints | None:
        """None for an unconstrained request. Raises ValueError (a bad or too slow constraint) with a message
        for the user; compiling hits the compiler's cache when the server already checked the spec."""
        if not params.constrained:
            return None
        return cls(matcher=compiler.matcher(params.structured_outputs) if params.structured_outputs else None,
                   logit_bias=params.logit_bias or None, allowed_token_ids=params.allowed_token_ids,
                   bad_words_token_ids=bad_words_token_ids(params.bad_words, tokenizer))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete: end the request as stopped."""
        return self.matcher is not None and self.matcher.is_terminated

    def accept(self, token_ids: list[int]) -> bool:
        """Advance the grammar over the tokens the request keeps; False if it rejects them (a mask was not
        applied: an engine bug, best ended as an error)."""
        return self.matcher is None or self.matcher.accept_tokens(token_ids)

    def row(self, output_token_ids: Sequence[int], bitmask_row: int) -> RowConstraints:
        return RowConstraints(bitmask_row=bitmask_row if self.matcher is not None else None,
                              logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
                              bad_words_token_ids=self.bad_words_token_ids, output_token_ids=output_token_ids)


StepEntry = tuple[RequestConstraints | None, Sequence[int], Sequence[int], Sequence[int] | None]


def plan_rows(entries: Sequence[StepEntry]) -> tuple[list[MaskJob], list[RowConstraints | None]]:
    """For each sampling request (constraints, output ids so far, draft ids, draft parents or None for a
    chain): its logits rows, bitmask row i for logits row i. Returns the worker's jobs and the logits
    step's rows. A chain draft's row j sees the output plus the draft's first j tokens (for bad words); a
    tree's row j + 1 sees the output plus node j's path."""
    jobs: list[MaskJob] = []
    rows: list[RowConstraints | None] = []
    for constraints, output, draft, parents in entries:
        first = len(rows)
        if constraints is None:
            rows.extend([None] * (1 + len(draft)))
            continue
        if constraints.matcher is not None:
            jobs.append(MaskJob(constraints.matcher, first, tuple(draft), None if parents is None else tuple(parents)))
        rows.append(constraints.row(output, first))
        for j in range(len(draft)):
            rows.append(constraints.row([*output, *_path(draft, parents, j)], first + 1 + j))
    return jobs, rows


def _path(draft: Sequence[int], parents: Sequence[int] | None, node: int) -> list[int]:
    """The draft tokens from the root down to `node`, inclusive."""
    if parents is None:
        return list(draft[:node + 1])
    path = []
    while node != -1:
        path.append(draft[node])
        node = parents[node]
    return path[::-1]

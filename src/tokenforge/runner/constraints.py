"""Output constraints in the runner: grammars (JSON schema, regex, choice, Lark/GBNF), logit bias, allowed
token ids and bad words, applied to the logits of the requests that ask for them.

Each constrained request's `RequestConstraints` (with its grammar matcher) lives with the runner's copy of
the request. Per step: the bitmask rows for the step's sampling rows (a speculative request's draft
positions included) are computed on the worker thread while the model runs; after the forward pass they
and the other constraints are applied to the logits in one batched step, so greedy and sampled rows, the
rejection sampler and the logprobs all see the constrained distribution. The tokens each request keeps
then advance its matcher; a grammar that is complete ends its request (`RunnerOutput.terminated`).
"""

from __future__ import annotations

import torch

from tokenforge.config import MAX_DRAFT_TOKENS
from tokenforge.runner.batch import BatchEntry, RunnerRequest
from tokenforge.sampling_params import SamplingParams
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.structured.logits import RowConstraints, apply_constraints
from tokenforge.structured.state import RequestConstraints, plan_rows
from tokenforge.structured.worker import BitmaskWorker, MaskHandle


class ConstraintStep:
    """Constraint state for the runner: `compiler` (shared with request validation, so compiles hit its
    cache), the tokenizer (bad words), and a bitmask worker sized for `max_requests` sampling requests."""

    def __init__(self, compiler: GrammarCompiler, tokenizer, vocab_size: int, max_requests: int):
        self.compiler = compiler
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_rows = max_requests * (MAX_DRAFT_TOKENS + 1)
        self._worker: BitmaskWorker | None = None

    def make(self, params: SamplingParams) -> RequestConstraints | None:
        return RequestConstraints.from_params(params, self.compiler, self.tokenizer) if params.constrained else None

    @property
    def worker(self) -> BitmaskWorker:
        if self._worker is None:
            with torch.inference_mode(False):  # its thread writes the bitmask outside inference mode
                self._worker = BitmaskWorker(self.vocab_size, self.max_rows)
        return self._worker

    def start(self, sampling: list[BatchEntry],
              requests: dict[str, RunnerRequest]) -> tuple[MaskHandle | None, list[RowConstraints | None]] | None:
        """Plan the step's logits rows and start their masks (None when no sampling request is constrained).
        Rows follow the logits: one per sampling request, 1 + len(draft) for a speculative one."""
        if not any(requests[e.req_id].constraints is not None for e in sampling):
            return None
        entries = [(requests[e.req_id].constraints, requests[e.req_id].output_token_ids, e.draft_token_ids,
                    e.draft_parents) for e in sampling]
        jobs, rows = plan_rows(entries)
        return (self.worker.submit(jobs) if jobs else None), rows

    @staticmethod
    def apply(logits: torch.Tensor, pending: tuple[MaskHandle | None, list[RowConstraints | None]]) -> None:
        handle, rows = pending
        apply_constraints(logits, rows, handle.wait().bitmask if handle is not None else None)

    def stats(self) -> dict:
        """Grammar mask time per token (one bitmask row) at p50 and p99, once any mask was computed."""
        times = self._worker.mask_time_percentiles((50, 99)) if self._worker is not None else {}
        return {f"structured_mask_seconds_p{int(p)}": v for p, v in times.items()}

    @staticmethod
    def accept(req: RunnerRequest, tokens: list[int]) -> bool:
        """Advance the request's grammar over the tokens it keeps; True when the grammar is now complete."""
        if req.constraints is None:
            return False
        if not req.constraints.accept(tokens):
            raise RuntimeError(f"request {req.req_id}: the grammar rejected tokens {tokens} drawn under its own "
                               "mask; this is a bug in tokenforge")
        return req.constraints.is_terminated

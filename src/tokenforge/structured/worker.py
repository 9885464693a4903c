"""Computing a step's grammar bitmasks in the background: `BitmaskWorker` fills the rows of a preallocated
int32 bitmask for a list of matchers on its own thread, so the work overlaps the model's forward pass
(llguidance releases the GIL while it computes a mask, and torch does in its kernels).

Use per step: `handle = worker.submit(jobs)` right after the batch is laid out and before the forward pass;
`result = handle.wait()` after it, before the logits are processed. The bitmask is reused across steps, so a
step's result is valid until the next `submit`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tokenforge.structured.matcher import GrammarMatcher

MAX_TIMINGS = 100_000  # mask times kept for the percentiles: a long benchmark's worth


@dataclass
class MaskJob:
    """One request's rows this step: `row` for its current state and, with a draft, `row + 1 + j` for
    draft node j (parents as in `GrammarMatcher.fill_draft_bitmasks`)."""

    matcher: GrammarMatcher
    row: int
    draft_token_ids: Sequence[int] = ()
    draft_parents: Sequence[int] | None = None


@dataclass
class MaskResult:
    bitmask: torch.Tensor  # [max_rows, words]; only the jobs' rows are meaningful
    num_valid_draft_tokens: list[int] = field(default_factory=list)  # per job: draft tokens the grammar allows


class MaskHandle:
    """What `submit` returns: `wait()` blocks until the masks are written and re-raises a failure."""

    def __init__(self, future: Future):
        self._future = future

    def wait(self) -> MaskResult:
        return self._future.result()

    def done(self) -> bool:
        return self._future.done()


class BitmaskWorker:
    """One background thread and one preallocated bitmask of `max_rows` rows for a vocabulary of
    `vocab_size` tokens (the logits' width). Per-row mask times are kept for `mask_time_percentiles`."""

    def __init__(self, vocab_size: int, max_rows: int):
        self.bitmask = torch.full((max_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-bitmask")
        self._pending: MaskHandle | None = None
        self.mask_times_s: deque[float] = deque(maxlen=MAX_TIMINGS)  # seconds per computed row

    @property
    def max_rows(self) -> int:
        return self.bitmask.shape[0]

    def submit(self, jobs: Sequence[MaskJob]) -> MaskHandle:
        """Start filling the jobs' rows. A previous step's handle is waited for first (the bitmask is shared)."""
        for job in jobs:
            last = job.row + len(job.draft_token_ids)
            if not 0 <= job.row <= last < self.max_rows:
                raise ValueError(f"bitmask rows {job.row}..{last} are outside the worker's {self.max_rows} rows")
        if self._pending is not None:
            self._pending._future.exception()  # wait; the failure belonged to that step's caller
        self._pending = MaskHandle(self._pool.submit(self._fill, list(jobs)))
        return self._pending

    def _fill(self, jobs: list[MaskJob]) -> MaskResult:
        num_valid = []
        for job in jobs:
            start = time.perf_counter()
            if job.draft_token_ids:
                num_valid.append(job.matcher.fill_draft_bitmasks(self.bitmask, job.row, list(job.draft_token_ids),
                                                                 None if job.draft_parents is None
                                                                 else list(job.draft_parents)))
            else:
                job.matcher.fill_bitmask(self.bitmask, job.row)
                num_valid.append(0)
            per_row = (time.perf_counter() - start) / (1 + len(job.draft_token_ids))
            self.mask_times_s.extend([per_row] * (1 + len(job.draft_token_ids)))
        return MaskResult(self.bitmask, num_valid)

    def mask_time_percentiles(self, percentiles: Sequence[float] = (50, 99)) -> dict[float, float]:
        """Mask time per row (one token position) in seconds, at the given percentiles; empty if none yet."""
        if not self.mask_times_s:
            return {}
        times = torch.tensor(list(self.mask_times_s), dtype=torch.float64)
        return {p: float(times.quantile(p / 100)) for p in percentiles}

    def close(self) -> None:
        self._pool.shutdown(wait=True)

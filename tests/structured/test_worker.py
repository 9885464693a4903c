"""The bitmask worker fills the same rows the matchers fill themselves, drafts included, on its own thread;
failures reach the caller; rows outside its bitmask are refused."""

from __future__ import annotations

import threading

import pytest
import torch

from tokenforge.structured.params import StructuredOutputsParams as Spec
from tokenforge.structured.worker import BitmaskWorker, MaskJob


def test_the_worker_fills_each_jobs_rows_like_the_matchers_do(compiler, tokenizer):
    specs = [Spec(regex="[0-9]{2,5}"), Spec(json={"type": "array", "items": {"type": "integer"}}),
             Spec(choice=["alpha", "beta"])]
    matchers = [compiler.matcher(s) for s in specs]
    draft = tokenizer.encode("[1, 2", add_special_tokens=False)
    worker = BitmaskWorker(compiler.vocab_size, max_rows=8)
    threads = []
    matchers[0].fill_bitmask = _recording(matchers[0].fill_bitmask, threads)
    result = worker.submit([MaskJob(matchers[0], 0), MaskJob(matchers[1], 1, draft), MaskJob(matchers[2], 7)]).wait()

    expected = torch.zeros(8, compiler.bitmask_width, dtype=torch.int32)
    matchers[0].fill_bitmask(expected, 0)
    assert matchers[1].fill_draft_bitmasks(expected, 1, draft) == len(draft)
    matchers[2].fill_bitmask(expected, 7)
    rows = [0, *range(1, 2 + len(draft)), 7]
    assert torch.equal(result.bitmask[rows], expected[rows])
    assert result.num_valid_draft_tokens == [0, len(draft), 0]
    assert threads[0] != threading.get_ident()  # computed on the worker's thread
    assert len(worker.mask_times_s) == 3 + len(draft)
    assert set(worker.mask_time_percentiles()) == {50, 99}
    worker.close()


def _recording(fill, threads):
    def wrapped(*args):
        threads.append(threading.get_ident())
        return fill(*args)
    return wrapped


def test_rows_outside_the_bitmask_are_refused(compiler):
    worker = BitmaskWorker(compiler.vocab_size, max_rows=2)
    with pytest.raises(ValueError, match="outside the worker's 2 rows"):
        worker.submit([MaskJob(compiler.matcher(Spec(regex="a")), 1, [5, 6])])
    assert worker.mask_time_percentiles() == {}
    worker.close()


def test_a_failure_in_the_worker_reaches_the_caller_and_the_next_step_runs(compiler):
    worker = BitmaskWorker(compiler.vocab_size, max_rows=2)
    broken = compiler.matcher(Spec(regex="a"))
    broken.fill_bitmask = lambda bitmask, row: 1 / 0
    with pytest.raises(ZeroDivisionError):
        worker.submit([MaskJob(broken, 0)]).wait()
    handle = worker.submit([MaskJob(compiler.matcher(Spec(regex="a")), 0)])
    handle.wait()
    assert handle.done()
    worker.close()

"""Scheduler decisions with made-up requests and a fake runner: chunking, budgets, preemption, aborts."""

from tokenforge.config import SchedulerConfig
from tokenforge.engine.messages import RunnerOutput
from tokenforge.engine.scheduler import Scheduler
from tokenforge.kv import KVCacheManager
from tokenforge.request import Request, RequestStatus
from tokenforge.sampling_params import SamplingParams


def _sched(budget=16, seqs=8, blocks=64, block=4, ctx=1000):
    kv = KVCacheManager(blocks, block)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs), kv, ctx)


def _req(req_id, n_prompt, max_tokens=4):
    return Request(req_id, list(range(100, 100 + n_prompt)), SamplingParams(max_tokens=max_tokens), max_tokens,
                   frozenset())


def _samples(s, r):
    """Whether a scheduled entry reaches the end of its request's known tokens (so a token is drawn)."""
    return r.num_computed_tokens + r.num_new_tokens - len(r.draft_token_ids) == s.requests[r.req_id].num_tokens


def _step(s, token=7):
    out = s.schedule()
    sampling = [r.req_id for r in out.requests if _samples(s, r)]
    s.update_from_output(out, RunnerOutput(sampled={req_id: [token] for req_id in sampling}))
    return out


def test_long_prompt_is_chunked_and_decodes_join():
    s = _sched(budget=16)
    s.add_request(_req("short", 3))
    s.add_request(_req("long", 40))
    out = _step(s)
    assert [(r.req_id, r.num_new_tokens) for r in out.requests] == [("short", 3), ("long", 13)]
    out = s.schedule()
    assert [(r.req_id, r.num_new_tokens, _samples(s, r)) for r in out.requests] == [("short", 1, True),
                                                                                  ("long", 15, False)]
    s.update_from_output(out, RunnerOutput(sampled={"short": [7]}))
    out = s.schedule()
    assert out.requests[1].num_computed_tokens == 28 and out.requests[1].num_new_tokens == 12
    assert _samples(s, out.requests[1])


def test_max_num_seqs_limits_admission():
    s = _sched(budget=100, seqs=2)
    for i in range(3):
        s.add_request(_req(f"r{i}", 2))
    out = s.schedule()
    assert len(out.requests) == 2 and len(s.waiting) == 1


def test_preemption_frees_newest_and_readmits():
    s = _sched(budget=64, blocks=6, block=4)
    s.add_request(_req("a", 8, max_tokens=8))
    s.add_request(_req("b", 8, max_tokens=8))
    _step(s)  # both prefilled: 2 blocks each + first tokens
    preempted = []
    for _ in range(12):
        out = _step(s)
        preempted += out.preempted_req_ids
        if not s.has_unfinished_requests():
            break
    assert "b" in preempted and "a" not in preempted
    assert not s.has_unfinished_requests()
    assert s.kv.num_used_blocks == 0


def test_abort_frees_blocks_anywhere():
    s = _sched()
    s.add_request(_req("run", 5))
    s.add_request(_req("wait", 5))
    s.config = SchedulerConfig(max_num_batched_tokens=5, max_num_seqs=8)
    _step(s)
    assert [r.req_id for r in s.running] == ["run"] and [r.req_id for r in s.waiting] == ["wait"]
    assert s.kv.num_used_blocks > 0
    done = s.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.req_id for r in done} == {"run", "wait"}
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in done)
    assert s.kv.num_used_blocks == 0 and not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == ["run"]  # the runner holds only what it was sent


def test_stop_token_and_length():
    s = _sched()
    r = Request("x", [1, 2, 3], SamplingParams(max_tokens=5, stop_token_ids=[9]), 5, frozenset({2}))
    s.add_request(r)
    _step(s, token=4)
    _step(s, token=9)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 9
    r2 = _req("y", 3, max_tokens=2)
    s.add_request(r2)
    _step(s)
    _step(s)
    assert r2.status == RequestStatus.FINISHED_LENGTH and r2.output_token_ids == [7, 7]
    assert s.kv.num_used_blocks == 0

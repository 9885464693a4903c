"""The messages between scheduler and runner are values: they pickle, share no list with live state, and
the runner's copy of every request, rebuilt only from them, always equals the scheduler's."""

import pickle

from tokenforge.config import SchedulerConfig, SpeculativeConfig
from tokenforge.engine.messages import Draft, RunnerOutput
from tokenforge.engine.scheduler import Scheduler
from tokenforge.kv import KVCacheManager
from tokenforge.request import Request
from tokenforge.runner.batch import RequestStates
from tokenforge.sampling_params import SamplingParams
from tokenforge.spec import SpecDecoder


def _req(req_id, n_prompt, max_tokens=6, seed=None):
    params = SamplingParams(max_tokens=max_tokens, seed=seed, temperature=0.5)
    return Request(req_id, list(range(10, 10 + n_prompt)), params, max_tokens, frozenset())


def _check_in_step(s: Scheduler, states: RequestStates) -> None:
    """After a message, the runner holds exactly the scheduler's tokens and table of each running request."""
    for req_id, req in s.requests.items():
        if req in s.running:
            assert states[req_id].token_ids() == req.all_token_ids
            assert states[req_id].block_table == s.kv.block_tables[req_id]


def _run(s: Scheduler, states: RequestStates, steps: int, token=5, drafts=None) -> list:
    """Step the scheduler, passing every message through pickle to the runner's side."""
    sent = []
    for _ in range(steps):
        out = s.schedule()
        wire = pickle.loads(pickle.dumps(out))
        assert wire == out
        sent.append(wire)
        states.apply(wire)
        _check_in_step(s, states)
        entries = [states.entry(r) for r in wire.requests]
        for e in entries:  # the rows the runner would compute are the scheduler's tokens at those positions
            req = s.requests[e.req_id]
            assert e.token_ids == req.all_token_ids[e.num_computed_tokens:e.num_computed_tokens + len(e.token_ids)]
        sampled = {e.req_id: e.draft_token_ids + [token] for e in entries if e.sample}  # drafts all accepted
        s.update_from_output(out, RunnerOutput(sampled=sampled, drafts=drafts or {}))
    return sent


def test_new_requests_are_sent_once_then_deltas():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16), KVCacheManager(32, 4), 1000)
    states = RequestStates()
    s.add_request(_req("a", 6, seed=3))
    s.add_request(_req("b", 30))
    first, second, third = _run(s, states, 3)
    assert [n.req_id for n in first.new_requests] == ["a", "b"]
    assert second.new_requests == [] and third.new_requests == []
    a2 = next(r for r in second.requests if r.req_id == "a")
    assert a2.new_token_ids == [5] and a2.new_block_ids == []  # one sampled token, no new block yet
    b2 = next(r for r in second.requests if r.req_id == "b")
    assert b2.new_token_ids == [] and len(b2.new_block_ids) > 0  # a prompt chunk: only its new blocks
    # the runner's copies are its own: changing them cannot touch the scheduler's request
    states["a"].output_token_ids.append(99)
    assert s.requests["a"].output_token_ids[-1] != 99
    assert states["a"].generator is not None and states["b"].generator is None


def test_preemption_restarts_the_runner_table_and_finished_requests_are_dropped():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(6, 4), 1000)
    states = RequestStates()
    s.add_request(_req("a", 8, max_tokens=8))
    s.add_request(_req("b", 8, max_tokens=8))
    sent = _run(s, states, 12)
    assert any("b" in m.preempted_req_ids for m in sent)
    assert not s.has_unfinished_requests()
    s_last = s.schedule()  # the step after the last finish tells the runner to drop what is left
    states.apply(pickle.loads(pickle.dumps(s_last)))
    assert not states and s.kv.num_used_blocks == 0


def test_drafts_travel_in_the_messages():
    spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=3, disable_batch_size=8), 1000)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(32, 4), 1000, spec)
    states = RequestStates()
    s.add_request(_req("a", 5, max_tokens=20))
    first = _run(s, states, 1, drafts={"a": Draft([7, 8, 9])})[0]
    assert first.requests[0].num_lookahead == 3  # it will be decoding after this step: asked for a draft
    second = _run(s, states, 1)[0]
    assert second.requests[0].draft_token_ids == [7, 8, 9] and second.requests[0].num_new_tokens == 4
    third = s.schedule()  # all three drafts were accepted, then the target's own token
    assert third.requests[0].new_token_ids == [7, 8, 9, 5]
    assert spec.num_draft_tokens == spec.num_accepted_tokens == 3

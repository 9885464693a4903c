"""Engine behaviour through the public APIs on a tiny checkpoint: sampling reproducibility, stops,
logprobs, aborts, validation errors and the streaming async engine. The pool must end empty."""

import asyncio
import threading
import time

import pytest
import torch

from tests.conftest import varied_prompts
from tokenforge import LLM, SamplingParams
from tokenforge.engine.async_engine import AsyncLLMEngine
from tokenforge.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), max_num_batched_tokens=64)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_is_reproducible_across_batch_mixes(llm):
    prompts = varied_prompts(6, seed=2)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    alone = _ids(llm.generate(prompt_token_ids=[prompts[0]], sampling_params=seeded))[0]
    mixed = llm.generate(prompt_token_ids=prompts[1:4] + [prompts[0]] + prompts[4:],
                         sampling_params=[other] * 3 + [seeded] + [other] * 2)
    assert mixed[3].outputs[0].token_ids == alone
    different = SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=10, ignore_eos=True)
    assert _ids(llm.generate(prompt_token_ids=[prompts[0]], sampling_params=different))[0] != alone
    assert llm.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_survives_preemption(llama_dir):
    prompts = varied_prompts(8, seed=5, lo=20, hi=40)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    roomy = _ids(LLM(str(llama_dir)).generate(prompt_token_ids=prompts, sampling_params=params))
    tight = LLM(str(llama_dir), num_blocks=24, block_size=4)
    assert _ids(tight.generate(prompt_token_ids=prompts, sampling_params=params)) == roomy
    assert tight.stats()["num_preemptions"] > 0


def test_max_tokens_eos_and_stop_token(llm):
    prompt = varied_prompts(1, seed=3)[0]
    greedy = _ids(llm.generate(prompt_token_ids=[prompt],
                               sampling_params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))[0]
    stop_tok = greedy[4]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[stop_tok], ignore_eos=True))[0].outputs[0]
    first = greedy.index(stop_tok)
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=3,
                                                                                   ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"


def test_stop_string_cuts_text(llm):
    prompt = "def fibonacci(n):"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))[0]
    text = out.outputs[0].text
    assert text == full[:full.index(stop)] and stop not in text
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert llm.client.engine.kv.num_used_blocks == 0


def test_logprobs_match_raw_distribution(llm, llama_dir):
    prompt = varied_prompts(1, seed=4)[0]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=2, logprobs=3, ignore_eos=True))[0].outputs[0]
    from tests.conftest import hf_model

    with torch.no_grad():
        ref = torch.log_softmax(hf_model(llama_dir)(torch.tensor([prompt])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] and first.rank == 1
    assert abs(first.logprob - ref[first.token_id].item()) < 1e-4
    assert [t for t, _ in first.top_logprobs] == ref.topk(3).indices.tolist()


def test_invalid_requests_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]])
    with pytest.raises(ValueError, match="context length"):
        llm.generate(prompt_token_ids=[[5] * 300])
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(prompt_token_ids=[[5] * 10], sampling_params=SamplingParams(max_tokens=250))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate(prompt_token_ids=[[5, 10**6]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    stats = llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0


def test_abort_mid_generation_frees_blocks(llama_dir):
    engine = LLMEngine.from_args(str(llama_dir))
    for i, p in enumerate(varied_prompts(4, seed=6)):
        engine.add_request(f"r{i}", prompt_token_ids=p, params=SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    held = {req_id: len(table) for req_id, table in engine.kv.block_tables.items()}
    used = engine.kv.num_used_blocks
    engine.abort_request(["r0", "r2"])
    assert engine.kv.num_used_blocks == used - held["r0"] - held["r2"]  # freed at once, not at the end
    seen = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.add(out.req_id)
            assert len(out.outputs[0].token_ids) <= 50
    assert seen == {"r1", "r3"}  # aborted requests make no more tokens
    assert engine.kv.num_used_blocks == 0 and not engine.runner.requests  # the runner dropped them all


def test_async_engine_streams_and_cancels(llama_dir):
    engine = AsyncLLMEngine.from_args(str(llama_dir))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def collect(prompt):
        text, ids = "", []
        async for out in engine.generate(prompt_token_ids=prompt, params=greedy):
            text += out.outputs[0].new_text
            ids = out.outputs[0].token_ids
        return text, list(ids), out

    async def cancel_after(prompt, n):
        seen = 0
        async for _ in engine.generate(prompt_token_ids=prompt,
                                       params=SamplingParams(max_tokens=100, ignore_eos=True)):
            seen += 1
            if seen == n:
                break

    async def main():
        prompts = varied_prompts(4, seed=8)
        results = await asyncio.wait_for(asyncio.gather(
            *(collect(p) for p in prompts), *(cancel_after(p, 3) for p in prompts)), timeout=60)
        for _ in range(50):
            if engine.stats()["kv_blocks_used"] == 0 and not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        await engine.shutdown()
        return prompts, results[:4]

    prompts, results = asyncio.run(main())
    offline = LLM(str(llama_dir)).generate(prompt_token_ids=prompts, sampling_params=greedy)
    for (text, ids, last), off in zip(results, offline):
        assert ids == off.outputs[0].token_ids and text == off.outputs[0].text and last.finished
    assert engine.stats()["kv_blocks_used"] == 0


def test_the_stepping_loop_does_not_wait_for_the_event_loop(llama_dir):
    """Outputs are handed over and the next step starts at once: with the event loop busy elsewhere, the
    engine keeps stepping, and the stream then finds every token waiting. Calls on the engine queue between
    steps and run on the stepping thread."""
    engine = AsyncLLMEngine.from_args(str(llama_dir))
    steps = []
    step = engine.engine.step
    engine.engine.step = lambda: steps.append(threading.get_ident()) or step()

    async def main():
        try:
            stream = engine.generate(prompt_token_ids=varied_prompts(1, seed=3)[0],
                                     params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            first = await asyncio.wait_for(anext(stream), timeout=60)
            num_steps = len(steps)
            time.sleep(2.0)  # blocks the event loop: nothing takes outputs or asks for a step meanwhile
            assert len(steps) >= num_steps + 5 and not engine.engine.has_unfinished_requests()
            rest = [out async for out in stream]
            assert len(rest) == 5 and rest[-1].finished and len(first.outputs[0].token_ids) == 1
            return await engine.run_on_engine(lambda _: threading.get_ident())
        finally:  # a failed assertion must not leave the stepping thread holding the process open
            await engine.shutdown()

    assert asyncio.run(main()) == steps[0] and set(steps) == {steps[0]}


def test_submit_hands_each_step_to_a_sink(llama_dir):
    """A consumer of whole steps gets every output by a plain call on the event loop, the same tokens a
    stream gets; an aborted request sends nothing more and frees its blocks."""
    engine = AsyncLLMEngine.from_args(str(llama_dir))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = varied_prompts(2, seed=4)

    async def main():
        got: dict[str, list] = {"a": [], "b": []}
        done = asyncio.Event()

        def sink(name, out):
            assert threading.current_thread() is threading.main_thread()
            got[name].append(out)
            if name == "a" and out.finished:
                done.set()

        engine.submit(lambda out: sink("a", out), params=greedy, req_id="a", prompt_token_ids=prompts[0])
        engine.submit(lambda out: sink("b", out), params=SamplingParams(max_tokens=200, ignore_eos=True),
                      req_id="b", prompt_token_ids=prompts[1])
        with pytest.raises(ValueError, match="already in use"):
            engine.submit(lambda out: None, params=greedy, req_id="a", prompt_token_ids=prompts[0])
        await asyncio.wait_for(done.wait(), timeout=60)
        engine.abort("b")
        num_b = len(got["b"])
        await engine.stop_loop()
        assert len(got["b"]) == num_b and not got["b"][-1].finished and engine.stats()["kv_blocks_used"] == 0
        await engine.shutdown()
        return got["a"]

    outs = asyncio.run(main())
    want = LLM(str(llama_dir)).generate(prompt_token_ids=[prompts[0]], sampling_params=greedy)[0]
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == want.outputs[0].token_ids

"""Ray for the cluster tests: one local instance per test module (starting Ray costs seconds), sized in logical
CPUs for the replicas the module runs, stopped at the module's end; and helpers to drive a `ClusterClient`
from plain tests. Replicas run the tiny checkpoint with one thread each."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import time

import pytest

from tokenforge.cluster.client import ClusterClient
from tokenforge.cluster.config import ClusterConfig
from tokenforge.engine.engine import LLMEngine
from tokenforge.sampling_params import SamplingParams

ENGINE_KWARGS = dict(kv_cache_memory="16MiB")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized(), "an earlier test left this process connected to Ray"
    ray.init(num_cpus=5, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ours = descendants()  # Ray's processes of this module: its servers and every worker
        ray.shutdown()
        assert wait_until(lambda: not alive(ours), 30), f"Ray processes left behind: {alive(ours)}"


def _process_table() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,cmd="], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        pid, ppid, cmd = (line.split(None, 2) + [""])[:3]
        rows.append((int(pid), int(ppid), cmd))
    return rows


def descendants(root: int | None = None) -> set[int]:
    """Every process below this one (Ray's servers, raylets, workers)."""
    table = _process_table()
    found, frontier = set(), {root or os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid, _ in table if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> list[str]:
    return [cmd for pid, _, cmd in _process_table() if pid in pids and "<defunct>" not in cmd]


def start_client(model, **config) -> ClusterClient:
    return ClusterClient.start(str(model), ENGINE_KWARGS, ClusterConfig(**config))


def run(client: ClusterClient, coro, timeout: float = 120.0):
    """Run a coroutine over the client on a fresh event loop, then stop the client's tasks on it."""

    async def main():
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:  # say where every task was stuck, then give up
                stacks = io.StringIO()
                for other in asyncio.all_tasks():
                    other.print_stack(file=stacks)
                task.cancel()
                raise AssertionError(f"timed out after {timeout} s; the tasks:\n{stacks.getvalue()}")
            return task.result()
        finally:
            await client.stop_loop()

    return asyncio.run(main())


async def collect(client: ClusterClient, req_id: str, prompt: list[int], params: SamplingParams,
                  on_output=None) -> list[list[int]]:
    """Each output's new tokens, after checking that every output's cumulative tokens are exactly the
    previous ones plus the new ones (no token repeated, none skipped)."""
    deltas, seen = [], []
    async for out in client.generate(params=params, req_id=req_id, prompt_token_ids=prompt):
        completion = out.outputs[0]
        assert completion.token_ids == seen + completion.new_token_ids, (req_id, seen, completion)
        seen = list(completion.token_ids)
        deltas.append(list(completion.new_token_ids))
        if on_output is not None:
            await on_output(out)
    return deltas


def reference(model, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Greedy tokens of one plain in-process engine."""
    engine = LLMEngine.from_args(str(model), num_threads=1, **ENGINE_KWARGS)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), params=params, prompt_token_ids=prompt)
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.req_id] = out.outputs[0].token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True

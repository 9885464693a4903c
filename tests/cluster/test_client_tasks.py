"""The client's background tasks end when asked, without Ray: a poll loop whose cancellation was swallowed
(Python 3.11's `wait_for` returns a result that arrives with the cancel) still stops, and nothing tries to
revive a replica once the client has shut down (a call on an actor then would start a new Ray instance)."""

from __future__ import annotations

import asyncio

import pytest

from tokenforge.cluster.client import ClusterClient
from tokenforge.cluster.config import ClusterConfig
from tokenforge.cluster.state import ReplicaState

pytestmark = pytest.mark.timeout(60)


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeActor:
    """Answers polls at once and counts every call made on it."""

    def __init__(self):
        self.calls = 0
        self.poll = _Remote(self._call)
        self.info = _Remote(self._call)

    def _call(self, *args):
        self.calls += 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(RuntimeError("the actor is gone"))
        return fut


@pytest.fixture
def client(llama_dir):
    return ClusterClient(str(llama_dir), {}, ClusterConfig(num_replicas=1))


def test_stop_loop_ends_a_task_that_swallowed_its_cancel(client):
    async def stubborn():
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # what wait_for does when its result and the cancel arrive together

    async def main():
        replica = ReplicaState(0, "mixed", FakeActor())
        client._replicas[0] = replica
        replica.poller = asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0.05)
        await asyncio.wait_for(client.stop_loop(), 5)
        assert replica.poller is None

    asyncio.run(main())


def test_a_poll_loop_ends_once_its_task_is_cancelling(client):
    async def main():
        replica = ReplicaState(0, "mixed", FakeActor())
        replica.state = "up"
        task = asyncio.current_task()
        task.cancel()  # pending: the loop must see it before it polls
        try:
            await asyncio.shield(asyncio.sleep(0))
        except asyncio.CancelledError:
            pass  # swallowed here, as wait_for may; the task still counts the request
        with pytest.raises(asyncio.CancelledError):
            await client._poll_loop(replica)
        assert replica.actor.calls == 0

    asyncio.run(main())


def test_nothing_revives_a_replica_after_shutdown(client):
    pytest.importorskip("ray")

    async def main():
        replica = ReplicaState(0, "mixed", FakeActor())
        replica.state = "up"
        client._replicas[0] = replica
        client._closed = True
        client._fail(replica, "its process failed (test)", kill=False)
        assert replica.reviver is None
        await asyncio.wait_for(client._revive(replica), 5)  # returns at once: Ray is not running
        assert replica.actor.calls == 0

    asyncio.run(main())

"""Leader election through the fake API server: one winner, take-over after expiry, release."""

from __future__ import annotations

import asyncio

import pytest

from cdi.backends.kube import KubeStore
from cdi.backends.kube_lease import LeaderElector, LostLeadership
from tests.cdi.backends.kube.conftest import store_on
from tests.support.fakekube import FakeKube

FAST = {"lease_duration": 1.0, "renew_deadline": 0.7, "retry_period": 0.05}


def elector(store: KubeStore, identity: str) -> LeaderElector:
    return LeaderElector(store, name="cdi-controller", namespace="cdi", identity=identity,
                         **FAST)


def holder(fake: FakeKube) -> str:
    lease = fake.get("Lease", "cdi-controller", "cdi")
    assert lease is not None
    return str(lease["spec"]["holderIdentity"])


def test_two_candidates_one_wins_the_other_takes_over_after_expiry(fake: FakeKube) -> None:
    async def main() -> None:
        async with store_on(fake) as store:
            a, b = elector(store, "a"), elector(store, "b")
            results = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
            assert sorted(results) == [False, True]  # never both
            leader, follower = (a, b) if results[0] else (b, a)
            assert holder(fake) == leader.identity
            # The leader renews; the follower keeps failing while it does.
            for _ in range(8):
                await asyncio.sleep(0.1)
                assert await leader.try_acquire_or_renew()
                assert not await follower.try_acquire_or_renew()
            # The leader dies without releasing: the follower waits out the duration.
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(follower.acquire(), 5)
            waited = asyncio.get_running_loop().time() - started
            assert waited >= FAST["lease_duration"] - 0.1
            lease = fake.get("Lease", "cdi-controller", "cdi")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == follower.identity
            assert lease["spec"]["leaseTransitions"] == 1
            # The old leader comes back and cannot renew.
            assert not await leader.try_acquire_or_renew()

    asyncio.run(main())


def test_release_on_shutdown_hands_over_at_once(fake: FakeKube) -> None:
    async def main() -> None:
        async with store_on(fake) as store:
            a, b = elector(store, "a"), elector(store, "b")
            stop = asyncio.Event()
            running = asyncio.Event()

            async def work() -> None:
                running.set()
                await stop.wait()

            first = asyncio.ensure_future(a.run(work))
            await asyncio.wait_for(running.wait(), 5)
            assert holder(fake) == "a"
            stop.set()
            await asyncio.wait_for(first, 5)
            assert holder(fake) == ""  # released
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(b.acquire(), 5)
            # b saw a free lease: no waiting out the duration
            assert asyncio.get_running_loop().time() - started < FAST["lease_duration"]
            assert holder(fake) == "b"

    asyncio.run(main())


def test_a_leader_that_loses_the_lease_stops_its_work(fake: FakeKube) -> None:
    async def main() -> None:
        async with store_on(fake) as store:
            a = elector(store, "a")
            cancelled = asyncio.Event()

            async def work() -> None:
                try:
                    await asyncio.sleep(60)
                finally:
                    cancelled.set()

            task = asyncio.ensure_future(a.run(work))
            await asyncio.sleep(0.2)
            assert holder(fake) == "a"
            # Someone else takes the Lease (an operator, a split brain).
            fake.patch("Lease", "cdi-controller", "cdi", {"spec": {"holderIdentity": "z"}})
            with pytest.raises(LostLeadership):
                await asyncio.wait_for(task, 5)
            assert cancelled.is_set()
            assert holder(fake) == "z"  # not released: it is not ours

    asyncio.run(main())


def test_timings_must_nest() -> None:
    with pytest.raises(ValueError, match="retry_period"):
        LeaderElector(None, name="x", namespace="y", identity="z",  # type: ignore[arg-type]
                      lease_duration=1, renew_deadline=2, retry_period=0.5)

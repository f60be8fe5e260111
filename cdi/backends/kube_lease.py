"""Leader election with a ``coordination.k8s.io/v1`` Lease, so one controller acts at a time.

On Kubernetes the controller Deployment may run several replicas (rolling
updates run two for a while); two copies reconciling the same DataVolume
would race.  Each candidate tries to become the Lease's ``holderIdentity``;
the holder renews ``renewTime`` every ``retry_period`` and gives up (stops its
work) if it could not renew for ``renew_deadline``; the others take the Lease
over once it has not changed for ``lease_duration``, measured on their own
clock from when they last saw it change (so clock skew between nodes does not
matter, as in client-go).  On shutdown the holder releases the Lease (empty
holder, duration 1 s) so a successor need not wait.  Writes carry the
resourceVersion they read: of two candidates writing at once, one gets
``Conflict`` and stays a follower.

It uses only the object store port, so it is tested like the rest, against
the fake API server, through ``KubeStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cdi.api import errors
from cdi.backends.port import ObjectStore

log = logging.getLogger(__name__)


class LostLeadership(Exception):
    """The Lease could not be renewed in time; the work was stopped."""


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, store: ObjectStore, *, name: str, namespace: str, identity: str,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self._store = store
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._clock = clock
        self._observed: tuple[Any, float] | None = None  # (spec, local time seen)
        self.is_leader = False

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True if we hold the Lease afterwards."""
        now = _micro_time()
        ours = {"holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": now, "renewTime": now, "leaseTransitions": 0}
        try:
            lease = await self._store.get("Lease", self.name, self.namespace)
        except errors.NotFound:
            try:
                await self._store.create({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": ours})
            except (errors.AlreadyExists, errors.Conflict):
                return False
            self._observe(ours)
            return self._became(True)
        spec: dict[str, Any] = dict(lease.get("spec") or {})
        self._observe(spec)
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity and not self._expired(spec):
            return self._became(False)
        if holder == self.identity:
            ours["acquireTime"] = spec.get("acquireTime", now)
            ours["leaseTransitions"] = spec.get("leaseTransitions", 0)
        else:
            ours["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        updated = copy.deepcopy(lease)
        updated["spec"] = ours
        try:
            await self._store.replace(updated)  # carries the resourceVersion we read
        except (errors.Conflict, errors.NotFound):
            return False
        self._observe(ours)
        if holder != self.identity:
            log.info("LEASE %s/%s acquired identity=%s previous=%s", self.namespace,
                     self.name, self.identity, holder or "-")
        return self._became(True)

    def _observe(self, spec: Any) -> None:
        if self._observed is None or self._observed[0] != spec:
            self._observed = (copy.deepcopy(spec), self._clock())

    def _expired(self, spec: dict[str, Any]) -> bool:
        assert self._observed is not None
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        return self._clock() - self._observed[1] > duration

    def _became(self, leader: bool) -> bool:
        self.is_leader = leader
        return leader

    async def acquire(self) -> None:
        """Wait until we hold the Lease."""
        while not await self._attempt():
            await asyncio.sleep(self.retry_period)

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except errors.APIError as e:
            log.warning("LEASE %s/%s: %s", self.namespace, self.name, e)
            return False

    async def hold(self) -> None:
        """Renew until a renewal is overdue; then raise ``LostLeadership``."""
        last = self._clock()
        while True:
            await asyncio.sleep(self.retry_period)
            if await self._attempt():
                last = self._clock()
            elif self._clock() - last >= self.renew_deadline or (
                    self._observed is not None
                    and (self._observed[0] or {}).get("holderIdentity") not in
                    ("", None, self.identity)):
                self.is_leader = False
                raise LostLeadership(f"lease {self.namespace}/{self.name} lost by "
                                     f"{self.identity}")

    async def release(self) -> None:
        """Give the Lease up if we hold it, so a successor starts at once."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            lease = await self._store.get("Lease", self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            released = copy.deepcopy(lease)
            released["spec"] = dict(lease["spec"], holderIdentity="", leaseDurationSeconds=1,
                                    renewTime=_micro_time())
            await self._store.replace(released)
            log.info("LEASE %s/%s released by %s", self.namespace, self.name, self.identity)
        except errors.APIError as e:
            log.warning("LEASE %s/%s not released: %s", self.namespace, self.name, e)

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Acquire, run ``work`` while renewing, release.  ``LostLeadership`` if the
        Lease was lost (``work`` is cancelled then); ``work``'s own result otherwise."""
        await self.acquire()
        task = asyncio.ensure_future(work())
        holder = asyncio.ensure_future(self.hold())
        try:
            done, _ = await asyncio.wait({task, holder}, return_when=asyncio.FIRST_COMPLETED)
            if holder in done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                holder.result()  # raises LostLeadership
            await task
        finally:
            for t in (task, holder):
                t.cancel()
            await asyncio.gather(task, holder, return_exceptions=True)
            await asyncio.shield(self.release())

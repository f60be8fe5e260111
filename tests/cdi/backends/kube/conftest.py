"""Fixtures: a started fake API server, and a ``KubeStore`` on it run inside ``asyncio.run``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from cdi.backends.kube import KubeStore
from tests.support.fakekube import FakeKube

T = TypeVar("T")


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = FakeKube().start()
    try:
        yield server
    finally:
        server.stop()
    assert server.errors == [], "the fake API server failed:\n" + "\n".join(server.errors)


def store_on(fake: FakeKube, **kw: Any) -> KubeStore:
    kw.setdefault("retry_delay", 0.02)
    return KubeStore(fake.config(), **kw)


async def with_store(fake: FakeKube, fn: Callable[[KubeStore], Awaitable[T]],
                     **kw: Any) -> T:
    async with store_on(fake, **kw) as store:
        return await fn(store)

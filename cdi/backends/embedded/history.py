"""The embedded store's recent changes, and the watches that follow them.

Kubernetes clients list, then watch from the list's ``resourceVersion``, and
resume a broken watch from the last version they saw.  That needs the events
*after* a version, so the store keeps the most recent ones in memory, in
commit order, and fans every new one out to the live watches.  When a client
asks for a version older than what is retained, it gets ``Gone`` and relists,
exactly as with a real API server whose watch cache has moved on.

Everything here runs on the event loop thread: the store publishes a commit's
events with ``loop.call_soon_threadsafe`` from its database thread, so they
arrive in commit order.  A subscription's queue is unbounded; a watcher that
never reads keeps every event of its kind in memory until it stops watching.
Watches filter at publish time, so a slow watcher of one kind does not hold
events of others.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Iterable

from cdi.api.errors import Gone
from cdi.backends.port import WatchEvent

Predicate = Callable[[WatchEvent], bool]


@dataclasses.dataclass(eq=False)
class Subscription:
    """One watch: the events it wants, and where they go.

    ``None`` in the queue means the store closed; the watch ends after it.
    """

    wants: Predicate
    queue: asyncio.Queue[WatchEvent | None] = dataclasses.field(default_factory=asyncio.Queue)


class History:
    """The last ``size`` events, in resourceVersion order, and their watchers.

    ``resource_version`` is the version of the newest event (or the store's
    version when opened).  Every event with a version above ``floor`` is
    retained; a watch from below ``floor`` cannot be served.
    """

    def __init__(self, size: int, resource_version: int) -> None:
        if size < 1:
            raise ValueError(f"history size must be at least 1, not {size}")
        self._events: collections.deque[tuple[int, WatchEvent]] = collections.deque(maxlen=size)
        self._subscriptions: set[Subscription] = set()
        self.floor = resource_version
        self.resource_version = resource_version
        self.closed = False

    def publish(self, events: Iterable[tuple[int, WatchEvent]]) -> None:
        """Record committed events (in commit order) and wake their watchers."""
        for rv, event in events:
            if len(self._events) == self._events.maxlen:
                self.floor = self._events[0][0]
            self._events.append((rv, event))
            self.resource_version = rv
            for sub in self._subscriptions:
                if sub.wants(event):
                    sub.queue.put_nowait(event)

    def subscribe(self, wants: Predicate, after: int) -> Subscription:
        """A subscription whose queue starts with the retained events after
        version ``after`` and then receives every new one.

        Raises ``Gone`` if events after ``after`` were already dropped.
        """
        if after < self.floor:
            raise Gone(f"too old resource version: {after} ({self.floor + 1})")
        sub = Subscription(wants)
        for rv, event in self._events:
            if rv > after and wants(event):
                sub.queue.put_nowait(event)
        if self.closed:
            sub.queue.put_nowait(None)
        else:
            self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def close(self) -> None:
        """End every watch once it has read what it was sent."""
        self.closed = True
        for sub in self._subscriptions:
            sub.queue.put_nowait(None)
        self._subscriptions.clear()

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    @property
    def size(self) -> int:
        return self._events.maxlen or 0

    def __len__(self) -> int:
        return len(self._events)

"""``?watch=true`` on a real server: events, timeouts, 410, disconnects and shutdown."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import requests

from cdi.api import errors
from cdi.backends.embedded.store import SQLiteStore
from cdi.backends.port import WatchEvent
from tests.cdi.apiserver.conftest import Api
from tests.cdi.apiserver.harness import ApiServer, auth, datavolume
from tests.cdi.apiserver.test_resources import DVS, MERGE, assert_status


def events_of(response: requests.Response) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"])
            for e in map(json.loads, response.iter_lines()) if e]


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_watch_streams_changes_then_ends_on_timeout(api: Api) -> None:
    start = time.monotonic()
    with api("GET", DVS, params={"watch": "true", "timeoutSeconds": "2"}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers.get("Transfer-Encoding") == "chunked"
        api("POST", DVS, json=datavolume("a"))
        api("PATCH", DVS + "/a", json={"metadata": {"labels": {"x": "1"}}}, headers=MERGE)
        api("POST", "/apis/cdi.kubevirt.io/v1beta1/namespaces/other/datavolumes",
            json=datavolume("elsewhere", namespace="other"))
        api("DELETE", DVS + "/a")
        events = events_of(r)
    elapsed = time.monotonic() - start
    assert events == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert 1.5 < elapsed < 6


def test_watch_from_a_resource_version_replays(api: Api) -> None:
    listed = api("GET", DVS).json()
    api("POST", DVS, json=datavolume("a", labels={"app": "web"}))
    api("POST", DVS, json=datavolume("b", labels={"app": "db"}))
    params = {"watch": "1", "timeoutSeconds": "1",
              "resourceVersion": listed["metadata"]["resourceVersion"]}
    with api("GET", DVS, params=params, stream=True) as r:
        assert events_of(r) == [("ADDED", "a"), ("ADDED", "b")]
    with api("GET", DVS, params=dict(params, labelSelector="app=db"), stream=True) as r:
        assert events_of(r) == [("ADDED", "b")]
    with api("GET", DVS, params=dict(params, fieldSelector="metadata.name=a"),
             stream=True) as r:
        assert events_of(r) == [("ADDED", "a")]
    all_namespaces = "/apis/cdi.kubevirt.io/v1beta1/datavolumes"
    with api("GET", all_namespaces, params=params, stream=True) as r:
        assert events_of(r) == [("ADDED", "a"), ("ADDED", "b")]


def test_too_old_resource_version_is_gone(make_server: Callable[..., ApiServer]) -> None:
    server = make_server(history_size=2)
    api = Api(server.url)
    try:
        for i in range(5):
            api("POST", DVS, json=datavolume(f"dv{i}"))
        r = api("GET", DVS, params={"watch": "true", "resourceVersion": "1"})
        assert_status(r, 410, "Expired")
        assert_status(api("GET", DVS, params={"watch": "true", "timeoutSeconds": "x"}), 400,
                      "BadRequest")
    finally:
        api.close()


def test_client_disconnect_ends_the_watch(server: ApiServer, api: Api) -> None:
    with api("GET", DVS, params={"watch": "true"}, stream=True) as r:
        assert r.status_code == 200
        wait_for(lambda: server.call(_watches) == 1)
    wait_for(lambda: server.call(_watches) == 0, timeout=5)


def test_shutdown_with_open_watches_is_quick(server: ApiServer, api: Api) -> None:
    results: list[Any] = []

    def watch() -> None:
        try:
            with requests.get(server.url + DVS, params={"watch": "true"}, headers=auth(),
                              stream=True, timeout=30) as r:
                results.append(events_of(r))
        except requests.RequestException as e:  # pragma: no cover - reported below
            results.append(e)

    threads = [threading.Thread(target=watch) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: server.call(_watches) == 3)
    api("POST", DVS, json=datavolume("a"))
    elapsed = server.stop()
    for t in threads:
        t.join(timeout=10)
    assert elapsed < 5, f"shutdown took {elapsed:.1f}s"
    assert results == [[("ADDED", "a")]] * 3


async def _watches(store: Any) -> int:
    return int(store.watches)


class FailingWatchStore(SQLiteStore):
    """Watches that fail the way a store may: ``resourceVersion`` picks how."""

    def watch(self, kind: str, namespace: str | None = None, *,
              resource_version: str | None = None,
              label_selector: str | None = None) -> AsyncIterator[WatchEvent]:
        return self._failing(super().watch(kind, namespace), resource_version or "")

    async def _failing(self, events: AsyncIterator[WatchEvent],
                       how: str) -> AsyncIterator[WatchEvent]:
        try:
            if how != "gone-at-once":
                yield await anext(events)
            if how == "crash-later":
                raise RuntimeError("secret store detail")
            raise errors.Gone("too old resource version: 1 (5)")
        finally:
            await events.aclose()


@pytest.mark.parametrize("how, reason, message", [
    ("gone-later", "Expired", "too old resource version: 1 (5)"),
    ("crash-later", "InternalError", "Internal error, see the server log"),
])
def test_store_errors_after_the_start_end_the_stream(
        make_server: Callable[..., ApiServer], how: str, reason: str, message: str,
        caplog: Any) -> None:
    server = make_server(store_class=FailingWatchStore)
    api = Api(server.url)
    try:
        assert_status(api("GET", DVS, params={"watch": "1", "resourceVersion": "gone-at-once"}),
                      410, "Expired", "too old resource version: 1 (5)")
        with caplog.at_level(logging.WARNING, logger="cdi.apiserver"):
            with api("GET", DVS, params={"watch": "1", "resourceVersion": how},
                     stream=True) as r:
                assert r.status_code == 200
                api("POST", DVS, json=datavolume("a"))
                events = [json.loads(line) for line in r.iter_lines() if line]
        assert [e["type"] for e in events] == ["ADDED", "ERROR"]
        status = events[1]["object"]
        assert (status["kind"], status["reason"], status["message"]) == ("Status", reason,
                                                                         message)
        assert "secret" not in json.dumps(events)
        assert server.call(_watches) == 0
    finally:
        api.close()

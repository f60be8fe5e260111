"""The wait for the upload server: ready within the wait, never ready, not an upload target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import requests

from tests.uploadproxy.conftest import NAMESPACE, PVC, Token
from tests.uploadproxy.servers import DictResolver, Upstream, target
from uploadproxy import NotReadyYet, NotUploadTarget, UploadTarget


def _post(http: requests.Session, proxy: str, token: str) -> requests.Response:
    return http.post(f"{proxy}/v1beta1/upload", data=b"data",
                     headers={"Authorization": f"Bearer {token}"})


def test_not_ready_then_ready_within_the_wait(make_proxy: Callable[..., str],
                                              upstream: tuple[Upstream, str],
                                              resolver: DictResolver, http: requests.Session,
                                              token: Token) -> None:
    server, url = upstream
    resolver.set(NAMESPACE, PVC, None, NotReadyYet("pod is Pending"), None, target(url))
    proxy = make_proxy(ready_interval=0.1, ready_timeout=5.0)
    started = time.monotonic()
    response = _post(http, proxy, token())
    assert (response.status_code, response.text) == (200, "upload ok")
    assert 0.3 <= time.monotonic() - started < 3
    assert resolver.calls == [(NAMESPACE, PVC)] * 4
    assert len(server.seen) == 1


def test_still_not_ready_is_503_with_the_escaped_reason(
        make_proxy: Callable[..., str], upstream: tuple[Upstream, str], resolver: DictResolver,
        http: requests.Session, token: Token) -> None:
    resolver.set(NAMESPACE, PVC, NotReadyYet("pod <script>alert(1)</script> is Pending"))
    proxy = make_proxy(ready_interval=0.1, ready_timeout=0.5)
    started = time.monotonic()
    response = _post(http, proxy, token())
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.text == ("upload server for ns/disk is not ready: "
                             "pod &lt;script&gt;alert(1)&lt;/script&gt; is Pending")
    assert "<script>" not in response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert 0.5 <= elapsed < 2
    assert 3 <= len(resolver.calls) <= 7
    assert upstream[0].seen == []


def test_still_not_ready_without_a_reason(make_proxy: Callable[..., str], resolver: DictResolver,
                                          http: requests.Session, token: Token) -> None:
    resolver.set(NAMESPACE, PVC, None)
    response = _post(http, make_proxy(ready_interval=0.05, ready_timeout=0.2), token())
    assert (response.status_code, response.text) == (
        503, "upload server for ns/disk is not ready: still not ready after 0.2 s")


def test_names_from_the_token_are_escaped(make_proxy: Callable[..., str], resolver: DictResolver,
                                          http: requests.Session, token: Token) -> None:
    resolver.set("n<s>", "d&k", None)
    response = _post(http, make_proxy(ready_interval=0.05, ready_timeout=0.1),
                     token("n<s>", "d&k"))
    assert response.status_code == 503
    assert response.text.startswith("upload server for n&lt;s&gt;/d&amp;k is not ready")


def test_not_an_upload_target_is_refused_at_once(make_proxy: Callable[..., str],
                                                 upstream: tuple[Upstream, str],
                                                 resolver: DictResolver, http: requests.Session,
                                                 token: Token) -> None:
    resolver.set(NAMESPACE, PVC, NotUploadTarget("PVC <b>disk</b> is not an upload target"))
    started = time.monotonic()
    response = _post(http, make_proxy(ready_interval=1.0, ready_timeout=10.0), token())
    assert (response.status_code, response.text) == (
        503, "PVC &lt;b&gt;disk&lt;/b&gt; is not an upload target")
    assert time.monotonic() - started < 1
    assert resolver.calls == [(NAMESPACE, PVC)]
    assert upstream[0].seen == []


def test_already_finished_is_refused(proxy: str, resolver: DictResolver,
                                     http: requests.Session, token: Token) -> None:
    resolver.set(NAMESPACE, PVC, NotUploadTarget("PVC disk already finished uploading"))
    response = _post(http, proxy, token())
    assert (response.status_code, response.text) == (503, "PVC disk already finished uploading")


def test_zero_timeout_asks_once(make_proxy: Callable[..., str], resolver: DictResolver,
                                http: requests.Session, token: Token) -> None:
    resolver.set(NAMESPACE, PVC, None)
    response = _post(http, make_proxy(ready_timeout=0.0), token())
    assert response.status_code == 503
    assert resolver.calls == [(NAMESPACE, PVC)]


class _Hanging:
    async def upload_server(self, namespace: str, pvc: str) -> UploadTarget | None:
        await asyncio.sleep(60)
        raise AssertionError("not reached")


def test_a_hanging_resolver_does_not_hold_the_client(make_proxy: Callable[..., str],
                                                     http: requests.Session,
                                                     token: Token) -> None:
    proxy = make_proxy(resolver=_Hanging(), ready_interval=0.1, ready_timeout=0.5)
    started = time.monotonic()
    response = _post(http, proxy, token())
    assert (response.status_code, response.text) == (
        503, "upload server for ns/disk is not ready: no answer about the upload server in time")
    assert time.monotonic() - started < 2

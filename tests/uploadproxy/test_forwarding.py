"""Every endpoint reaches the upload server with the same bytes, the right headers and path."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
import requests

from tests.uploadproxy.conftest import NAMESPACE, PVC, Token, UpstreamFactory
from tests.uploadproxy.servers import DictResolver, Upstream, target
from uploadproxy import routing

BODY = os.urandom(1024 * 1024 + 17)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_endpoint_table() -> None:
    assert list(routing.upload_paths()) == [
        f"/{v}/{n}" for v in ("v1beta1", "v1alpha1")
        for n in ("upload", "upload-async", "upload-form", "upload-form-async",
                  "upload-archive", "upload-archive-async")]
    assert [p for p in routing.async_paths() if "v1beta1" in p] == [
        "/v1beta1/upload-async", "/v1beta1/upload-form-async", "/v1beta1/upload-archive-async"]


@pytest.mark.parametrize("path", list(routing.upload_paths()))
def test_each_upload_path_passes_through(proxy: str, upstream: tuple[Upstream, str],
                                         token: Token, http: requests.Session,
                                         path: str) -> None:
    server, _ = upstream
    checksum = "sha256:" + hashlib.sha256(BODY).hexdigest()
    response = http.post(
        f"{proxy}{path}?offset=0&note=a%2Fb", data=BODY,
        headers={**_auth(token()), "Content-Type": "application/octet-stream",
                 "X-Checksum": checksum, "X-Other": "dropped"})
    assert (response.status_code, response.text) == (200, "upload ok")
    assert response.headers["Access-Control-Allow-Origin"] == "*"

    [seen] = server.seen
    assert (seen.method, seen.path, seen.query) == ("POST", path, "offset=0&note=a%2Fb")
    assert seen.complete and seen.size == len(BODY)
    assert seen.sha256 == hashlib.sha256(BODY).hexdigest()
    assert (server.spool / "1.body").read_bytes() == BODY
    assert seen.headers["Content-Length"] == str(len(BODY))
    assert seen.headers["Content-Type"] == "application/octet-stream"
    assert seen.headers["X-Checksum"] == checksum
    assert "Transfer-Encoding" not in seen.headers
    assert "Authorization" not in seen.headers and "X-Other" not in seen.headers


def test_chunked_upload_stays_chunked(proxy: str, upstream: tuple[Upstream, str],
                                      token: Token, http: requests.Session) -> None:
    server, _ = upstream

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(BODY), 100_000):
            yield BODY[i:i + 100_000]

    response = http.post(f"{proxy}/v1beta1/upload", data=chunks(), headers=_auth(token()))
    assert response.status_code == 200
    [seen] = server.seen
    assert seen.sha256 == hashlib.sha256(BODY).hexdigest()
    assert seen.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in seen.headers


def test_form_upload_keeps_the_multipart_body(proxy: str, upstream: tuple[Upstream, str],
                                              token: Token, http: requests.Session) -> None:
    server, _ = upstream
    request = requests.Request("POST", f"{proxy}/v1beta1/upload-form",
                               files={"file": ("disk.img", BODY)},
                               headers=_auth(token())).prepare()
    assert isinstance(request.body, bytes)
    response = http.send(request)
    assert response.status_code == 200
    [seen] = server.seen
    assert seen.headers["Content-Type"] == request.headers["Content-Type"]
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert seen.sha256 == hashlib.sha256(request.body).hexdigest()


@pytest.mark.parametrize(("path", "upstream_path"), [
    ("/v1beta1/upload", "/v1beta1/upload-archive"),
    ("/v1beta1/upload-form", "/v1beta1/upload-archive"),
    ("/v1beta1/upload-async", "/v1beta1/upload-archive-async"),
    ("/v1beta1/upload-form-async", "/v1beta1/upload-archive-async"),
    ("/v1alpha1/upload", "/v1alpha1/upload-archive"),
    ("/v1alpha1/upload-async", "/v1alpha1/upload-archive-async"),
    ("/v1beta1/upload-archive", "/v1beta1/upload-archive"),
    ("/v1alpha1/upload-archive-async", "/v1alpha1/upload-archive-async"),
])
def test_archive_pvcs_go_to_the_archive_endpoint(
        proxy: str, upstream: tuple[Upstream, str], resolver: DictResolver, token: Token,
        http: requests.Session, path: str, upstream_path: str) -> None:
    server, url = upstream
    resolver.set(NAMESPACE, PVC, target(url, "archive"))
    response = http.post(f"{proxy}{path}?offset=3", data=b"tar", headers=_auth(token()))
    assert response.status_code == 200
    [seen] = server.seen
    assert (seen.path, seen.query) == (upstream_path, "offset=3")


def test_empty_content_type_is_kubevirt(proxy: str, upstream: tuple[Upstream, str],
                                        resolver: DictResolver, token: Token,
                                        http: requests.Session) -> None:
    server, url = upstream
    resolver.set(NAMESPACE, PVC, target(url, ""))
    assert http.post(f"{proxy}/v1beta1/upload", data=b"x", headers=_auth(token())).ok
    assert server.seen[0].path == "/v1beta1/upload"


def test_invalid_content_type_is_refused(proxy: str, upstream: tuple[Upstream, str],
                                         resolver: DictResolver, token: Token,
                                         http: requests.Session) -> None:
    server, url = upstream
    resolver.set(NAMESPACE, PVC, target(url, "<i>iso</i>"))
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x", headers=_auth(token()))
    assert response.status_code == 503
    assert response.text == ("rejecting upload request for PVC ns/disk: "
                             "upload content-type &lt;i&gt;iso&lt;/i&gt; is invalid")
    assert response.headers["Content-Type"].startswith("text/plain")
    assert server.seen == []


@pytest.mark.parametrize("path", list(routing.async_paths()))
def test_head_probe_on_async_paths(proxy: str, upstream: tuple[Upstream, str], token: Token,
                                   http: requests.Session, path: str) -> None:
    server, _ = upstream
    response = http.head(f"{proxy}{path}", headers=_auth(token()))
    assert response.status_code == 200
    assert [(s.method, s.path) for s in server.seen] == [("HEAD", path)]


def test_head_on_sync_paths_is_not_routed(proxy: str, token: Token,
                                          http: requests.Session) -> None:
    assert http.head(f"{proxy}/v1beta1/upload", headers=_auth(token())).status_code == 405


def test_upload_offset_is_proxied_with_its_query(proxy: str, upstream: tuple[Upstream, str],
                                                 token: Token, http: requests.Session) -> None:
    server, _ = upstream
    server.offset_answer = '{"offset": 4194304}'
    response = http.get(f"{proxy}/v1beta1/upload-offset?x=1", headers=_auth(token()))
    assert response.status_code == 200
    assert response.json() == {"offset": 4194304}
    assert response.headers["Content-Type"].startswith("application/json")
    [seen] = server.seen
    assert (seen.method, seen.path, seen.query) == ("GET", "/v1beta1/upload-offset", "x=1")

    assert http.get(f"{proxy}/v1beta1/upload-offset").status_code == 400
    assert len(server.seen) == 1


def test_the_token_decides_the_pvc(proxy: str, upstream: tuple[Upstream, str],
                                   make_upstream: UpstreamFactory, resolver: DictResolver,
                                   token: Token, http: requests.Session) -> None:
    first, _ = upstream
    other, other_url = make_upstream()
    resolver.set("other-ns", "other", target(other_url))
    response = http.post(f"{proxy}/v1beta1/upload", data=b"for the other one",
                         headers=_auth(token("other-ns", "other")))
    assert response.status_code == 200
    assert first.seen == [] and len(other.seen) == 1
    assert resolver.calls == [("other-ns", "other")]


def test_healthz(proxy: str, http: requests.Session) -> None:
    response = http.get(f"{proxy}/healthz")
    assert (response.status_code, response.text) == (200, "OK")


def test_get_on_upload_paths_is_not_allowed(proxy: str, http: requests.Session) -> None:
    response = http.get(f"{proxy}/v1beta1/upload")
    assert response.status_code == 405
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_a_chunked_answer_comes_back_whole(proxy: str, upstream: tuple[Upstream, str],
                                           token: Token, http: requests.Session) -> None:
    server, _ = upstream
    server.chunked_answer = os.urandom(100_000)
    r = http.post(f"{proxy}/v1beta1/upload", data=b"x" * 1000, timeout=30,
                  headers={"Authorization": f"Bearer {token()}"})
    assert (r.status_code, r.reason, r.headers["X-Answer"]) == (201, "Made It", "chunked")
    assert r.content == server.chunked_answer
    assert server.seen[0].size == 1000 and server.seen[0].complete


def test_a_body_with_a_length_ends_its_connection_on_the_local_hop(
        proxy: str, upstream: tuple[Upstream, str], token: Token,
        http: requests.Session) -> None:
    """The local hop takes such a body off aiohttp's parser (``uploadproxy.tap``), after
    which the connection cannot carry another request: the answer says so."""
    server, url = upstream
    first = http.post(f"{proxy}/v1beta1/upload", data=BODY, headers=_auth(token()))
    second = http.post(f"{proxy}/v1beta1/upload", data=BODY, headers=_auth(token()))
    assert (first.status_code, second.status_code) == (200, 200)
    local = url.startswith("unix:")
    assert (first.headers.get("Connection") == "close") is local
    assert [s.sha256 for s in server.seen] == [hashlib.sha256(BODY).hexdigest()] * 2

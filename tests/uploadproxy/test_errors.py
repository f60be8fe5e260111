"""Failures on either side: upstream answers relayed, upstream down or cut off, client gone,
internal errors hidden; CORS on every answer; the metrics."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY

from tests.uploadproxy.conftest import NAMESPACE, PVC, Token
from tests.uploadproxy.servers import DictResolver, Upstream, target
from uploadproxy import UploadTarget, create_app

MiB = 1024 * 1024


def _post(http: requests.Session, url: str, token: str, body: bytes = b"data",
          path: str = "/v1beta1/upload") -> requests.Response:
    return http.post(f"{url}{path}", data=body, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize(("status", "text"), [
    (400, "Saving stream failed: effective image size is larger than the reported available "
          "storage: 5Gi > 1Gi"),
    (409, "upload already completed"),
    (500, "Saving stream failed: <qemu-img> says no"),
    (503, "upload in progress, try again later"),
    (201, ""),
])
def test_upstream_answers_are_relayed(proxy: str, upstream: tuple[Upstream, str],
                                      http: requests.Session, token: Token,
                                      status: int, text: str) -> None:
    upstream[0].answer = (status, text)
    response = _post(http, proxy, token(), b"x" * MiB)
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Content-Length"] == str(len(text))
    assert upstream[0].seen[0].complete


@pytest.mark.parametrize("size", [10, 8 * MiB])
def test_early_upstream_answer_is_relayed(proxy: str, upstream: tuple[Upstream, str],
                                          http: requests.Session, token: Token,
                                          size: int) -> None:
    """CDI's upload server answers 503 "busy" without reading the body."""
    upstream[0].early = (503, "upload in progress")
    response = _post(http, proxy, token(), b"x" * size)
    assert (response.status_code, response.text) == (503, "upload in progress")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("where", ["tcp", "unix-missing", "unix-stale"])
def test_upstream_down_is_502(proxy: str, resolver: DictResolver, http: requests.Session,
                              token: Token, caplog: pytest.LogCaptureFixture, tmp_path: Path,
                              where: str) -> None:
    if where == "tcp":
        resolver.set(NAMESPACE, PVC, UploadTarget(f"http://127.0.0.1:{_free_port()}"))
    else:
        path = tmp_path / "gone.sock"
        if where == "unix-stale":  # a killed server's socket: bound, nobody listening
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
        resolver.set(NAMESPACE, PVC, target(f"unix:{path}"))
    response = _post(http, proxy, token(), b"x" * MiB)
    assert (response.status_code, response.text) == (
        502, "cannot reach the upload server for ns/disk")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "UNREACHABLE" in caplog.text


def test_upstream_closing_mid_body_is_502(proxy: str, upstream: tuple[Upstream, str],
                                          http: requests.Session, token: Token) -> None:
    upstream[0].close_after = MiB
    response = _post(http, proxy, token(), b"x" * (16 * MiB))
    assert (response.status_code, response.text) == (
        502, "the upload server for ns/disk closed the connection before answering")
    [seen] = upstream[0].seen
    assert not seen.complete and MiB <= seen.size < 16 * MiB
    # The proxy is fine afterwards.
    upstream[0].close_after = None
    assert _post(http, proxy, token()).status_code == 200


def test_upstream_closing_mid_answer_cuts_the_client(proxy: str, upstream: tuple[Upstream, str],
                                                    http: requests.Session,
                                                    token: Token) -> None:
    upstream[0].cut_answer = True
    with pytest.raises(requests.exceptions.RequestException):
        _post(http, proxy, token())
    upstream[0].cut_answer = False
    assert _post(http, proxy, token()).status_code == 200


def test_client_leaving_mid_upload_aborts_the_upstream(
        proxy: str, upstream: tuple[Upstream, str], http: requests.Session, token: Token,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = int(proxy.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((f"POST /v1beta1/upload HTTP/1.1\r\nHost: proxy\r\n"
                      f"Authorization: Bearer {token()}\r\n"
                      f"Content-Length: {64 * MiB}\r\n\r\n").encode())
        sock.sendall(b"x" * (2 * MiB))
        deadline = time.monotonic() + 10
        while not (upstream[0].seen and upstream[0].seen[0].size >= MiB):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while not upstream[0].seen[0].sha256:
        assert time.monotonic() < deadline, "upstream still waits for the body"
        time.sleep(0.01)
    [seen] = upstream[0].seen
    assert not seen.complete and seen.size <= 2 * MiB
    assert seen.sha256.startswith("failed:")
    assert _post(http, proxy, token()).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_internal_errors_are_hidden_and_logged(proxy: str, resolver: DictResolver,
                                               http: requests.Session, token: Token,
                                               caplog: pytest.LogCaptureFixture) -> None:
    resolver.set(NAMESPACE, PVC, RuntimeError("database password is hunter2"))
    response = _post(http, proxy, token())
    assert (response.status_code, response.text) == (
        500, "internal error, check the upload proxy log")
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "uploadproxy.app" and record.exc_info is not None
    assert "hunter2" in str(record.exc_info[1])


def test_cors_on_every_answer(proxy: str, resolver: DictResolver, http: requests.Session,
                              token: Token) -> None:
    answers = [
        http.get(f"{proxy}/healthz"),
        _post(http, proxy, token()),
        http.post(f"{proxy}/v1beta1/upload"),
        _post(http, proxy, "garbage"),
        http.get(f"{proxy}/nowhere"),
        _post(http, proxy, token(name="unknown")),
    ]
    assert [r.status_code for r in answers] == [200, 200, 400, 401, 404, 503]
    for response in answers:
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/v1beta1/upload", "/v1alpha1/upload-form-async",
                                  "/v1beta1/upload-offset", "/healthz"])
def test_cors_preflight(proxy: str, http: requests.Session, path: str) -> None:
    response = http.options(f"{proxy}{path}", headers={
        "Origin": "https://console.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Allow-Methods"] == "POST, GET, HEAD, OPTIONS"
    allowed = {h.strip().lower()
               for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "content-length", "x-checksum"} <= allowed


def test_no_preflight_for_unknown_paths(proxy: str, http: requests.Session) -> None:
    response = http.options(f"{proxy}/nowhere", headers={"Access-Control-Request-Method": "POST"})
    assert response.status_code == 404
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_bytes_and_answers(make_proxy: Callable[..., str],
                                         upstream: tuple[Upstream, str],
                                         http: requests.Session, token: Token) -> None:
    before_bytes = _sample("cdi_uploadproxy_upload_bytes_total")
    before_200 = _sample("cdi_uploadproxy_responses_total", {"code": "200"})
    before_401 = _sample("cdi_uploadproxy_responses_total", {"code": "401"})
    proxy = make_proxy(metrics_endpoint=True)
    assert _post(http, proxy, token(), b"y" * (3 * MiB + 5)).status_code == 200
    assert _post(http, proxy, "bad").status_code == 401
    assert _sample("cdi_uploadproxy_upload_bytes_total") - before_bytes == 3 * MiB + 5
    assert _sample("cdi_uploadproxy_responses_total", {"code": "200"}) - before_200 == 1
    assert _sample("cdi_uploadproxy_responses_total", {"code": "401"}) - before_401 == 1
    page = http.get(f"{proxy}/metrics")
    assert page.status_code == 200
    assert "cdi_uploadproxy_upload_bytes_total" in page.text


def test_metrics_endpoint_is_off_by_default(proxy: str, http: requests.Session) -> None:
    assert http.get(f"{proxy}/metrics").status_code == 404


@pytest.mark.parametrize(("timeout", "interval"), [(-1.0, 1.0), (1.0, 0.0)])
def test_create_app_checks_its_timings(resolver: DictResolver, token: Token,
                                       timeout: float, interval: float) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ValueError):
        create_app(public_key=key.public_key(), resolver=resolver, ready_timeout=timeout,
                   ready_interval=interval)

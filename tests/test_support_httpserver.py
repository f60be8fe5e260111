"""Tests of the test HTTP server in tests/support/httpserver.py."""

from __future__ import annotations

import email.utils
import os
import random
import socket
import ssl
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import requests

from tests.support.httpserver import FileServer, etag_for
from tests.support.tls import TLSFiles, client_ssl_context

MiB = 1024 * 1024


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def get(url: str, **kwargs: object) -> requests.Response:
    """requests.get that always consumes and closes the response."""
    with requests.get(url, timeout=10, **kwargs) as response:  # type: ignore[arg-type]
        _ = response.content
        return response


def head(url: str, **kwargs: object) -> requests.Response:
    with requests.head(url, timeout=10, **kwargs) as response:  # type: ignore[arg-type]
        return response


def raw_exchange(
    server: FileServer,
    request: bytes,
    context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as plain:
        sock: socket.socket = plain
        if context is not None:
            sock = context.wrap_socket(plain, server_hostname="127.0.0.1")
        try:
            sock.sendall(request)
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        finally:
            if sock is not plain:
                sock.close()
    return b"".join(chunks)


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head_part, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {data[:200]!r}"
    lines = head_part.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def request_bytes(method: str, target: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *extra, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        assert sep, "truncated chunk header"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert rest == b"\r\n", f"bad chunked trailer {rest[:20]!r}"
            return bytes(out)
        out += rest[:size]
        assert rest[size : size + 2] == b"\r\n", "chunk not followed by CRLF"
        body = rest[size + 2 :]


@pytest.fixture
def data_file(http_server: FileServer) -> tuple[Path, bytes]:
    data = payload(3 * MiB + 123)
    return http_server.put_file("disk.img", data), data


# --- plain serving ------------------------------------------------------------------


def test_get_serves_whole_file_with_validators(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    path, data = data_file
    response = get(http_server.url("disk.img"))
    st = path.stat()
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["ETag"] == etag_for(st)
    assert response.headers["ETag"] == f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
    assert response.headers["Last-Modified"] == email.utils.formatdate(st.st_mtime, usegmt=True)
    [record] = http_server.requests
    assert (record.method, record.path, record.status) == ("GET", "/disk.img", 200)
    assert record.headers["host"] == f"127.0.0.1:{http_server.port}"


def test_url_and_put_file(http_server: FileServer) -> None:
    assert http_server.url("a b.img") == f"http://127.0.0.1:{http_server.port}/a%20b.img"
    assert http_server.put_file("sub/dir/x.bin", b"xyz") == http_server.root / "sub/dir/x.bin"
    assert get(http_server.url("sub/dir/x.bin")).content == b"xyz"
    assert get(http_server.url("a b.img")).status_code == 404


def test_etag_changes_with_mtime(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    before = head(http_server.url("disk.img")).headers["ETag"]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    after = head(http_server.url("disk.img")).headers["ETag"]
    assert before != after


def test_head_has_headers_but_no_body(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    response = head(http_server.url("disk.img"))
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "ETag" in response.headers
    status, headers, body = split_response(
        raw_exchange(http_server, request_bytes("HEAD", "/disk.img"))
    )
    assert status == 200
    assert headers["content-length"] == str(len(data))
    assert body == b""


def test_keep_alive_serves_several_requests_on_one_connection(http_server: FileServer) -> None:
    http_server.put_file("a", b"first")
    http_server.put_file("b", b"second!")
    pipelined = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = raw_exchange(http_server, pipelined)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.endswith(b"\r\n\r\nsecond!")
    assert b"\r\n\r\nfirstHTTP/1.1 200" in data
    assert [r.method for r in http_server.requests] == ["GET", "HEAD", "GET"]


# --- ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [
        ("bytes=100-", 100, None),
        ("bytes=100-199", 100, 200),
        ("bytes=0-0", 0, 1),
        ("bytes=-50", -50, None),
        ("bytes=1048576-999999999999", 1048576, None),
    ],
)
def test_single_range_gives_206(
    http_server: FileServer,
    data_file: tuple[Path, bytes],
    range_header: str,
    start: int,
    stop: int | None,
) -> None:
    _, data = data_file
    expected = data[start:stop]
    first = len(data) + start if start < 0 else start
    response = get(http_server.url("disk.img"), headers={"Range": range_header})
    assert response.status_code == 206
    assert response.content == expected
    assert response.headers["Content-Length"] == str(len(expected))
    assert response.headers["Content-Range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    )
    [record] = http_server.requests
    assert record.headers["range"] == range_header
    assert record.status == 206


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-6", "bytes=9-3", "items=0-4", "bytes=-"])
def test_unusable_range_is_ignored(
    http_server: FileServer, data_file: tuple[Path, bytes], range_header: str
) -> None:
    _, data = data_file
    response = get(http_server.url("disk.img"), headers={"Range": range_header})
    assert response.status_code == 200
    assert response.content == data


def test_if_range_matching_etag_or_date_honours_range(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    validators = head(http_server.url("disk.img")).headers
    for if_range in (validators["ETag"], validators["Last-Modified"]):
        response = get(
            http_server.url("disk.img"), headers={"Range": "bytes=10-", "If-Range": if_range}
        )
        assert response.status_code == 206, if_range
        assert response.content == data[10:]


@pytest.mark.parametrize(
    "if_range",
    ['"not-the-etag"', "W/{etag}", "Tue, 01 Jan 2000 00:00:00 GMT", "garbage"],
)
def test_if_range_mismatch_gives_whole_file(
    http_server: FileServer, data_file: tuple[Path, bytes], if_range: str
) -> None:
    _, data = data_file
    etag = head(http_server.url("disk.img")).headers["ETag"]
    response = get(
        http_server.url("disk.img"),
        headers={"Range": "bytes=10-", "If-Range": if_range.format(etag=etag)},
    )
    assert response.status_code == 200
    assert response.content == data
    assert "Content-Range" not in response.headers


def test_unsatisfiable_range_gives_416(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    for range_header in (f"bytes={len(data)}-", f"bytes={len(data) + 5}-{len(data) + 9}"):
        response = get(http_server.url("disk.img"), headers={"Range": range_header})
        assert response.status_code == 416
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"
        assert len(response.content) < 100


def test_empty_file(http_server: FileServer) -> None:
    http_server.put_file("empty", b"")
    response = get(http_server.url("empty"))
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["Content-Length"] == "0"
    assert get(http_server.url("empty"), headers={"Range": "bytes=0-"}).status_code == 416


# --- missing and forbidden paths ----------------------------------------------------


def test_missing_file_gives_404(http_server: FileServer) -> None:
    response = get(http_server.url("nope.img"))
    assert response.status_code == 404
    assert 0 < len(response.content) < 100
    assert http_server.requests[0].status == 404


@pytest.mark.parametrize(
    "target",
    ["/../outside.txt", "/%2e%2e/outside.txt", "/sub/../../outside.txt", "/escape", "/sub/", "/"],
)
def test_paths_outside_root_or_not_files_give_404(http_server: FileServer, target: str) -> None:
    outside = http_server.root.parent / "outside.txt"
    outside.write_bytes(b"secret")
    (http_server.root / "sub").mkdir()
    (http_server.root / "escape").symlink_to(outside)
    status, _, body = split_response(raw_exchange(http_server, request_bytes("GET", target)))
    assert status == 404
    assert b"secret" not in body


def test_symlink_inside_root_is_served(http_server: FileServer) -> None:
    http_server.put_file("real.img", b"data")
    (http_server.root / "alias.img").symlink_to("real.img")
    assert get(http_server.url("alias.img")).content == b"data"


# --- per-path behaviour -------------------------------------------------------------


def test_basic_auth(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    _, data = data_file
    http_server.configure("disk.img", auth=("user", "pass"))
    url = http_server.url("disk.img")
    for auth in (None, ("user", "wrong"), ("other", "pass")):
        response = get(url, auth=auth)
        assert response.status_code == 401, auth
        assert response.headers["WWW-Authenticate"] == 'Basic realm="test"'
        assert data[:16] not in response.content
    assert head(url).status_code == 401
    response = get(url, auth=("user", "pass"))
    assert response.status_code == 200
    assert response.content == data
    assert get(http_server.url("other.img"), auth=None).status_code == 404  # only that path


def test_no_head_gives_405_to_head_only(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    http_server.configure("disk.img", no_head=True)
    assert head(http_server.url("disk.img")).status_code == 405
    assert get(http_server.url("disk.img")).content == data


def test_no_range_ignores_range_and_if_range(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    http_server.configure("disk.img", no_range=True)
    etag = head(http_server.url("disk.img")).headers["ETag"]
    response = get(
        http_server.url("disk.img"), headers={"Range": "bytes=10-20", "If-Range": etag}
    )
    assert response.status_code == 200
    assert response.content == data
    assert "Accept-Ranges" not in response.headers
    assert "Accept-Ranges" not in head(http_server.url("disk.img")).headers
    too_far = get(http_server.url("disk.img"), headers={"Range": f"bytes={len(data)}-"})
    assert too_far.status_code == 200


def test_redirect_to_path(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    _, data = data_file
    http_server.configure("old.img", redirect_to="/disk.img")
    response = get(http_server.url("old.img"))
    assert response.status_code == 200
    assert response.content == data
    assert [r.status_code for r in response.history] == [302]
    direct = head(http_server.url("old.img"), allow_redirects=False)
    assert direct.status_code == 302
    assert direct.headers["Location"] == "/disk.img"


def test_redirect_to_other_server(
    http_server: FileServer, https_server: FileServer, tls_files: TLSFiles
) -> None:
    https_server.put_file("moved.img", b"over tls")
    http_server.configure("disk.img", redirect_to=https_server.url("moved.img"))
    response = get(http_server.url("disk.img"), verify=str(tls_files.ca_cert))
    assert response.content == b"over tls"
    assert response.url == https_server.url("moved.img")
    assert [r.method for r in https_server.requests] == ["GET"]


def test_cut_sends_fewer_bytes_then_serves_normally(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    http_server.configure("disk.img", cut_after=1000)
    status, headers, body = split_response(
        raw_exchange(http_server, request_bytes("GET", "/disk.img"))
    )
    assert status == 200
    assert headers["content-length"] == str(len(data))
    assert body == data[:1000]
    assert head(http_server.url("disk.img")).status_code == 200  # HEAD does not count
    assert get(http_server.url("disk.img")).content == data


def test_cut_counts_from_range_start_and_repeats(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    _, data = data_file
    http_server.configure("disk.img", cut_after=10, cut_times=2)
    for _ in range(2):
        status, headers, body = split_response(
            raw_exchange(http_server, request_bytes("GET", "/disk.img", "Range: bytes=5000-"))
        )
        assert status == 206
        assert headers["content-range"] == f"bytes 5000-{len(data) - 1}/{len(data)}"
        assert body == data[5000:5010]
    response = get(http_server.url("disk.img"), headers={"Range": "bytes=5000-"})
    assert response.status_code == 206
    assert response.content == data[5000:]


def test_cut_is_a_short_read_for_requests(
    http_server: FileServer, data_file: tuple[Path, bytes]
) -> None:
    http_server.configure("disk.img", cut_after=MiB)
    with (
        requests.get(http_server.url("disk.img"), stream=True, timeout=10) as response,
        pytest.raises(requests.exceptions.ChunkedEncodingError),
    ):
        _ = response.content


def test_cut_over_tls(https_server: FileServer, tls_files: TLSFiles) -> None:
    data = payload(2 * MiB)
    https_server.put_file("disk.img", data)
    https_server.configure("disk.img", cut_after=123_456)
    try:
        raw = raw_exchange(
            https_server, request_bytes("GET", "/disk.img"), client_ssl_context(tls_files)
        )
    except ssl.SSLEOFError:
        pytest.fail("the client could not read the cut body")
    status, headers, body = split_response(raw)
    assert (status, headers["content-length"]) == (200, str(len(data)))
    assert body == data[:123_456]
    assert get(https_server.url("disk.img"), verify=str(tls_files.ca_cert)).content == data


def test_stall_pauses_then_closes(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    _, data = data_file
    http_server.configure("disk.img", stall_after=300, stall_seconds=0.6)
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=10) as sock:
        sock.sendall(request_bytes("GET", "/disk.img"))
        received = b""
        while not received.endswith(data[:300]):
            chunk = sock.recv(65536)
            assert chunk, "closed before the stall"
            received += chunk
        started = time.monotonic()
        assert sock.recv(65536) == b""
        waited = time.monotonic() - started
    assert 0.45 < waited < 5
    _, headers, body = split_response(received)
    assert headers["content-length"] == str(len(data))
    assert body == data[:300]
    assert get(http_server.url("disk.img")).content == data  # only the first GET stalls


def test_stop_interrupts_stall_and_idle_connections(tmp_path: Path) -> None:
    server = FileServer(tmp_path / "root")
    server.start()
    try:
        server.put_file("disk.img", payload(4096))
        server.configure("disk.img", stall_after=10, stall_seconds=60)
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled,
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle,
        ):
            stalled.sendall(b"GET /disk.img HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.sendall(b"HEAD /disk.img HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
            assert stalled.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.1)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 5
            idle_rest = idle.recv(65536)
            while stalled.recv(65536):
                pass
        assert idle_rest == b""
    finally:
        server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass
    assert not [t for t in threading.enumerate() if t.name.startswith(f"FileServer-{server.port}")]


def test_status_for_every_request(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    http_server.configure("disk.img", status=503)
    http_server.configure("gone.img", status=500)
    response = get(http_server.url("disk.img"), headers={"Range": "bytes=0-"})
    assert response.status_code == 503
    assert 0 < len(response.content) < 100
    assert head(http_server.url("disk.img")).status_code == 503
    assert get(http_server.url("gone.img")).status_code == 500
    assert [r.status for r in http_server.requests] == [503, 503, 500]


def test_content_type(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    http_server.configure("disk.img", content_type="application/x-qemu-disk")
    assert get(http_server.url("disk.img")).headers["Content-Type"] == "application/x-qemu-disk"


def test_chunked(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    _, data = data_file
    http_server.configure("disk.img", chunked=True)
    response = get(http_server.url("disk.img"), headers={"Range": "bytes=10-"})
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.headers
    assert "Accept-Ranges" not in response.headers
    status, headers, body = split_response(
        raw_exchange(http_server, request_bytes("GET", "/disk.img"))
    )
    assert status == 200
    assert "content-length" not in headers
    assert dechunk(body) == data


def test_chunked_cut(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    http_server.configure("disk.img", chunked=True, cut_after=2 * MiB)
    with (
        requests.get(http_server.url("disk.img"), stream=True, timeout=10) as response,
        pytest.raises(requests.exceptions.ChunkedEncodingError),
    ):
        _ = response.content


def test_change_after_first_get(
    http_server: FileServer, data_file: tuple[Path, bytes], tmp_path: Path
) -> None:
    _, old = data_file
    new = payload(2 * MiB, seed=7)
    replacement = tmp_path / "replacement.img"
    replacement.write_bytes(new)
    http_server.configure("disk.img", cut_after=4096, change_after_first_get=replacement)

    first_head = head(http_server.url("disk.img")).headers  # HEAD changes nothing
    assert first_head["Content-Length"] == str(len(old))
    status, headers, body = split_response(
        raw_exchange(http_server, request_bytes("GET", "/disk.img"))
    )
    assert (status, body) == (200, old[:4096])
    assert headers["etag"] == first_head["ETag"]

    after = head(http_server.url("disk.img")).headers
    assert after["ETag"] != first_head["ETag"]
    assert after["ETag"] == etag_for(replacement.stat())
    assert after["Content-Length"] == str(len(new))

    resumed = get(
        http_server.url("disk.img"),
        headers={"Range": "bytes=4096-", "If-Range": first_head["ETag"]},
    )
    assert resumed.status_code == 200
    assert resumed.content == new
    stale_date = get(
        http_server.url("disk.img"),
        headers={"Range": "bytes=4096-", "If-Range": "Tue, 01 Jan 2000 00:00:00 GMT"},
    )
    assert stale_date.status_code == 200
    ranged = get(
        http_server.url("disk.img"), headers={"Range": "bytes=4096-", "If-Range": after["ETag"]}
    )
    assert (ranged.status_code, ranged.content) == (206, new[4096:])


def test_configure_again_resets(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    _, data = data_file
    http_server.configure("/disk.img", status=500)
    assert get(http_server.url("disk.img")).status_code == 500
    http_server.configure("disk.img")
    assert get(http_server.url("disk.img")).content == data
    with pytest.raises(TypeError):
        http_server.configure("disk.img", bogus=True)  # type: ignore[call-arg]


def test_request_records(http_server: FileServer, data_file: tuple[Path, bytes]) -> None:
    with requests.Session() as session:
        session.headers["X-Custom-Header"] = "v1"
        for range_header in ("bytes=0-9", "bytes=10-"):
            with session.get(
                http_server.url("disk.img?x=1"), headers={"Range": range_header}, timeout=10
            ) as response:
                assert response.status_code == 206
    records = http_server.requests_for("disk.img")
    assert [r.headers["range"] for r in records] == ["bytes=0-9", "bytes=10-"]
    assert all(r.headers["x-custom-header"] == "v1" for r in records)
    assert all(r.query == "x=1" for r in records)
    assert http_server.requests_for("never.img") == []
    assert http_server.requests_for("disk.img", method="HEAD") == []
    http_server.clear_requests()
    assert http_server.requests == []


def test_unsupported_method_is_recorded(http_server: FileServer) -> None:
    status, _, _ = split_response(raw_exchange(http_server, request_bytes("DELETE", "/x")))
    assert status == 501
    assert [(r.method, r.status) for r in http_server.requests] == [("DELETE", 501)]


def test_client_disconnect_is_silent(http_server: FileServer) -> None:
    http_server.put_file("big.img", payload(8 * MiB))
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=10) as sock:
        sock.sendall(request_bytes("GET", "/big.img"))
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    assert get(http_server.url("big.img")).status_code == 200
    assert http_server.errors == []


# --- TLS ----------------------------------------------------------------------------


def test_tls_with_ca(https_server: FileServer, tls_files: TLSFiles) -> None:
    data = payload(3 * MiB)
    https_server.put_file("disk.img", data)
    assert https_server.url("disk.img").startswith("https://127.0.0.1:")
    response = get(https_server.url("disk.img"), verify=str(tls_files.ca_cert))
    assert response.content == data
    ranged = get(
        https_server.url("disk.img"), headers={"Range": "bytes=5-9"}, verify=str(tls_files.ca_cert)
    )
    assert (ranged.status_code, ranged.content) == (206, data[5:10])


def test_tls_ca_dir_holds_only_the_ca(https_server: FileServer, tls_files: TLSFiles) -> None:
    assert sorted(p.name for p in tls_files.ca_dir.iterdir()) == ["ca.crt"]
    assert (tls_files.ca_dir / "ca.crt").read_bytes() == tls_files.ca_cert.read_bytes()
    https_server.put_file("x", b"hello")
    context = ssl.create_default_context(cafile=str(tls_files.ca_dir / "ca.crt"))
    _, _, body = split_response(raw_exchange(https_server, request_bytes("GET", "/x"), context))
    assert body == b"hello"


def test_tls_without_ca_fails(https_server: FileServer) -> None:
    https_server.put_file("x", b"hello")
    with pytest.raises(requests.exceptions.SSLError):
        get(https_server.url("x"))
    assert https_server.requests == []


def test_tls_hostname_is_checked(https_server: FileServer, tls_files: TLSFiles) -> None:
    context = client_ssl_context(tls_files)
    with (
        socket.create_connection(("127.0.0.1", https_server.port), timeout=10) as plain,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(plain, server_hostname="not-this-host.example")


def test_silent_client_does_not_block_tls_accept(
    https_server: FileServer, tls_files: TLSFiles
) -> None:
    https_server.put_file("x", b"hello")
    with socket.create_connection(("127.0.0.1", https_server.port), timeout=10):
        response = get(https_server.url("x"), verify=str(tls_files.ca_cert))
    assert response.content == b"hello"


# --- streaming ----------------------------------------------------------------------


@pytest.mark.parametrize("use_tls", [False, True], ids=["http", "https"])
def test_large_file_is_streamed(
    http_server: FileServer, https_server: FileServer, tls_files: TLSFiles, use_tls: bool
) -> None:
    server = https_server if use_tls else http_server
    size = 48 * MiB
    with open(server.root / "big.raw", "wb") as f:
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"tail")
    received = 0
    last = b""
    tracemalloc.start()
    try:
        with requests.get(
            server.url("big.raw"), stream=True, timeout=30, verify=str(tls_files.ca_cert)
        ) as response:
            for chunk in response.iter_content(chunk_size=256 * 1024):
                received += len(chunk)
                last = chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert last.endswith(b"tail")
    assert peak < 12 * MiB, f"peak Python allocation {peak} bytes"

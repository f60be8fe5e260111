"""Token checks at the proxy, with CDI's codes: bad header 400, bad token 401, wrong use 400."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from tests.uploadproxy.conftest import Token
from tests.uploadproxy.servers import DictResolver, Upstream
from uploadproxy import auth, errors


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


MISSING = 'missing Authorization header, expected "Authorization: Bearer TOKEN"'
MALFORMED = 'malformed Authorization header, expected "Authorization: Bearer TOKEN"'


@pytest.mark.parametrize(("header", "text"), [
    (None, MISSING),
    ("", MISSING),
    ("Basic dXNlcjpwYXNz", MALFORMED),
    ("Bearer", MALFORMED),
    ("Bearer a b", MALFORMED),
    ("Bearer <script>", MALFORMED),
    ("Bearertoken", MALFORMED),
])
def test_bad_headers_are_400(proxy: str, upstream: tuple[Upstream, str], resolver: DictResolver,
                             http: requests.Session, header: str | None, text: str) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x", headers=headers)
    assert (response.status_code, response.text) == (400, text)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert upstream[0].seen == [] and resolver.calls == []


def _expired(token: Token) -> str:
    return token(now=datetime.now(UTC) - timedelta(minutes=10))


def _future(token: Token) -> str:
    return token(now=datetime.now(UTC) + timedelta(minutes=10))


@pytest.mark.parametrize(("make", "text"), [
    (lambda t, k: "not.a.jwt", "invalid token: token is malformed: header is not JSON"),
    (lambda t, k: _expired(t), "invalid token: token expired at "),
    (lambda t, k: _future(t), "invalid token: token is not valid before "),
    (lambda t, k: t(key=k), "invalid token: token signature is invalid"),
    (lambda t, k: t(issuer="cdi-deployment"),
     "invalid token: token issuer is &#x27;cdi-deployment&#x27;, not &#x27;cdi-apiserver&#x27;"),
])
def test_bad_tokens_are_401(proxy: str, upstream: tuple[Upstream, str], resolver: DictResolver,
                            http: requests.Session, token: Token, other_key: rsa.RSAPrivateKey,
                            make: Any, text: str) -> None:
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x",
                         headers={"Authorization": f"Bearer {make(token, other_key)}"})
    assert response.status_code == 401
    assert response.text.startswith(text)
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert upstream[0].seen == [] and resolver.calls == []


def test_tampered_token_is_401(proxy: str, http: requests.Session, token: Token) -> None:
    header, payload, signature = token().split(".")
    forged = f"{header}.{payload[:-2]}AA.{signature}"
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x",
                         headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"operation": "Clone"},
     "token does not allow this upload: token is for operation &#x27;Clone&#x27;, "
     "not &#x27;Upload&#x27;"),
    ({"resource": tokens.SNAPSHOT_RESOURCE},
     "token does not allow this upload: token is for resource "
     "snapshot.storage.k8s.io/v1/volumesnapshots, not v1/persistentvolumeclaims"),
])
def test_tokens_for_something_else_are_400(proxy: str, upstream: tuple[Upstream, str],
                                           resolver: DictResolver, http: requests.Session,
                                           token: Token, kwargs: dict[str, Any],
                                           text: str) -> None:
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x",
                         headers={"Authorization": f"Bearer {token(**kwargs)}"})
    assert (response.status_code, response.text) == (400, text)
    assert upstream[0].seen == [] and resolver.calls == []


def test_token_for_a_pvc_that_does_not_exist_is_503(proxy: str, upstream: tuple[Upstream, str],
                                                     http: requests.Session,
                                                     token: Token) -> None:
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x",
                         headers={"Authorization": f"Bearer {token('ns', '<b>gone</b>')}"})
    assert response.status_code == 503
    assert response.text == ("rejecting Upload Request for PVC &lt;b&gt;gone&lt;/b&gt; "
                             "that doesn&#x27;t exist")
    assert upstream[0].seen == []


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer  "])
def test_bearer_scheme_is_case_insensitive(proxy: str, http: requests.Session, token: Token,
                                           scheme: str) -> None:
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x",
                         headers={"Authorization": f"{scheme} {token()}"})
    assert response.status_code == 200


def test_no_query_parameter_fallback(proxy: str, http: requests.Session, token: Token) -> None:
    response = http.post(f"{proxy}/v1beta1/upload?token={token()}", data=b"x")
    assert response.status_code == 400


def test_token_never_in_logs(proxy: str, http: requests.Session, token: Token,
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good, expired = token(), _expired(token)
    for value in (good, expired, good + "x", "Bearer " + good):
        http.post(f"{proxy}/v1beta1/upload", data=b"x",
                  headers={"Authorization": f"Bearer {value}"})
    for value in (good, expired):
        signature = value.rsplit(".", 1)[1]
        assert signature not in caplog.text


def test_bearer_token_parser() -> None:
    assert auth.bearer_token({"Authorization": "Bearer a.b-c_d~e+f/g"}) == "a.b-c_d~e+f/g"
    with pytest.raises(errors.MalformedAuthorization):
        auth.bearer_token({"Authorization": "Bearer a=="})
    with pytest.raises(errors.MissingAuthorization):
        auth.bearer_token({})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _alg_none(token: str) -> str:
    _, payload, _ = token.split(".")
    head = _b64(b'{"alg":"none","typ":"JWT"}')
    return f"{head}.{payload}."


def _hs256_with_the_public_key(token: str, key: rsa.RSAPrivateKey) -> str:
    """The key-confusion attack: HMAC with the verifier's public key as the secret."""
    _, payload, _ = token.split(".")
    head = _b64(b'{"alg":"HS256","typ":"JWT"}')
    secret = tokens.public_key_pem(key)
    mac = hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{_b64(mac)}"


@pytest.mark.parametrize("attack", ["alg-none", "hs256-public-key"])
def test_forged_algorithms_are_401(proxy: str, upstream: tuple[Upstream, str],
                                   resolver: DictResolver, http: requests.Session,
                                   token: Token, signing_key: rsa.RSAPrivateKey,
                                   attack: str) -> None:
    good = token()
    forged = (_alg_none(good) if attack == "alg-none"
              else _hs256_with_the_public_key(good, signing_key))
    response = http.post(f"{proxy}/v1beta1/upload", data=b"x",
                         headers={"Authorization": f"Bearer {forged}"})
    assert (response.status_code, response.text) == (
        401, "invalid token: token is not signed with PS256")
    assert upstream[0].seen == [] and resolver.calls == []


def test_oversized_headers_are_refused(proxy: str, upstream: tuple[Upstream, str],
                                       resolver: DictResolver, http: requests.Session,
                                       token: Token) -> None:
    """aiohttp's limit on a header field (8 KiB) holds before any token check."""
    for headers in ({"Authorization": "Bearer " + "A" * 100_000},
                    {"Authorization": f"Bearer {token()}", "X-Padding": "p" * 100_000}):
        response = http.post(f"{proxy}/v1beta1/upload", data=b"x", headers=headers)
        assert response.status_code == 400
        assert "Got more than 8190 bytes" in response.text
    assert upstream[0].seen == [] and resolver.calls == []

"""Upload tokens: CDI's exact claim shape, PS256 signatures, and every way verification refuses."""

from __future__ import annotations

import base64
import json
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cdi.api import tokens

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload))


def _sign(key: rsa.RSAPrivateKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A token built by hand, to reach the checks behind the signature."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = key.sign(signing_input.encode(), pss, hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


# --- keys ---------------------------------------------------------------------------------------


def test_generate_key_writes_a_private_pem_once(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    tokens.generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert first.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = tokens.load_key(path)
    assert key.key_size == 2048

    tokens.generate_key(path)  # exists: left alone
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token.key"]


def test_generate_key_concurrently_yields_one_key(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    barrier = threading.Barrier(4)

    def make() -> None:
        barrier.wait()
        tokens.generate_key(path)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens.load_key(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token.key"]


def test_public_key_pem_round_trip(key: rsa.RSAPrivateKey) -> None:
    pem = tokens.public_key_pem(key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    public = tokens.load_public_key(pem)
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    assert tokens.verify(public, token, now=NOW).name == "disk"


def test_load_key_refuses_a_non_rsa_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.key"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ValueError, match="RSA"):
        tokens.load_key(path)


# --- shape --------------------------------------------------------------------------------------


def test_upload_token_has_cdis_exact_claims(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="default", name="fedora", now=NOW)
    header, payload = _parts(token)
    assert header == {"alg": "PS256", "typ": "JWT"}
    iat = int(NOW.timestamp())
    assert payload == {
        "iss": "cdi-apiserver",
        "iat": iat,
        "nbf": iat,
        "exp": iat + 300,
        "operation": "Upload",
        "name": "fedora",
        "namespace": "default",
        "resource": {"group": "", "version": "v1", "resource": "persistentvolumeclaims"},
    }
    # The signature is RSASSA-PSS SHA-256 with a 32-byte salt, checkable by any JOSE library.
    signing_input, _, signature = token.rpartition(".")
    key.public_key().verify(
        _unb64(signature), signing_input.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())


def test_clone_token_carries_resource_params_and_issuer(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="src", name="snap", operation=tokens.CLONE,
                         resource=tokens.SNAPSHOT_RESOURCE, lifetime=60, now=NOW,
                         params={"targetNamespace": "dst", "targetName": "copy"},
                         issuer="cdi-deployment")
    _, payload = _parts(token)
    assert payload["operation"] == "Clone"
    assert payload["exp"] - payload["iat"] == 60
    assert payload["resource"] == {"group": "snapshot.storage.k8s.io", "version": "v1",
                                   "resource": "volumesnapshots"}
    assert payload["params"] == {"targetNamespace": "dst", "targetName": "copy"}
    claims = tokens.verify(key.public_key(), token, now=NOW, issuer="cdi-deployment")
    assert claims.params == {"targetNamespace": "dst", "targetName": "copy"}
    tokens.check(claims, operation=tokens.CLONE, namespace="src", name="snap",
                 resource=tokens.SNAPSHOT_RESOURCE)


def test_round_trip(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    claims = tokens.verify(key.public_key(), token, now=NOW + timedelta(seconds=299))
    assert claims == tokens.Claims(
        issuer="cdi-apiserver", operation="Upload", namespace="ns", name="disk",
        resource=tokens.PVC_RESOURCE, expires=NOW + timedelta(seconds=300),
        not_before=NOW, issued_at=NOW, params={})
    tokens.check(claims, operation="Upload", namespace="ns", name="disk")
    tokens.check(claims, operation="Upload")  # any PVC, as the proxy asks


@pytest.mark.parametrize("kwargs", [{"namespace": "", "name": "x"}, {"namespace": "x", "name": ""},
                                    {"namespace": "x", "name": "y", "lifetime": 0}])
def test_issue_refuses_nonsense(key: rsa.RSAPrivateKey, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        tokens.issue(key, **kwargs)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [
    "",
    "abc",
    "a.b",
    "a.b.c.d",
    "!!!.e30.c2ln",
    "e30.e30.c2ln",                      # {} header: no alg, so not PS256
    _b64(b"not json") + ".e30.c2ln",
    _b64(b"[1]") + ".e30.c2ln",
    "x" * 20000,
])
def test_malformed_tokens(key: rsa.RSAPrivateKey, token: str) -> None:
    with pytest.raises((tokens.TokenMalformed, tokens.TokenBadSignature)):
        tokens.verify(key.public_key(), token, now=NOW)


def test_garbage_is_malformed_and_messages_hold_no_token(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    header, payload, signature = token.split(".")
    for bad in (f"{header}.{payload}", f"{header}.{payload}*.{signature}",
                f"{header}.{payload}.{signature}="):
        with pytest.raises(tokens.TokenMalformed) as info:
            tokens.verify(key.public_key(), bad, now=NOW)
        assert payload not in str(info.value) and signature not in str(info.value)


def test_tampered_payload_fails_the_signature(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    header, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    claims["name"] = "someone-elses-disk"
    forged = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(tokens.TokenBadSignature):
        tokens.verify(key.public_key(), forged, now=NOW)


def test_tampered_signature_fails(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    raw = bytearray(_unb64(token.rsplit(".", 1)[1]))
    raw[10] ^= 1
    with pytest.raises(tokens.TokenBadSignature):
        tokens.verify(key.public_key(), token.rsplit(".", 1)[0] + "." + _b64(bytes(raw)), now=NOW)


def test_other_key_fails_the_signature(key: rsa.RSAPrivateKey,
                                       other_key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(other_key, namespace="ns", name="disk", now=NOW)
    with pytest.raises(tokens.TokenBadSignature):
        tokens.verify(key.public_key(), token, now=NOW)


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256"])
def test_other_algorithms_are_refused(key: rsa.RSAPrivateKey, alg: str) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    _, payload, signature = token.split(".")
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    for forged in (f"{header}.{payload}.{signature}", f"{header}.{payload}."):
        with pytest.raises(tokens.TokenBadSignature):
            tokens.verify(key.public_key(), forged, now=NOW)


def test_expiry_with_leeway(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW, lifetime=300)
    public = key.public_key()
    exp = NOW + timedelta(seconds=300)
    tokens.verify(public, token, now=exp + timedelta(seconds=tokens.LEEWAY))
    with pytest.raises(tokens.TokenExpired) as info:
        tokens.verify(public, token, now=exp + timedelta(seconds=tokens.LEEWAY + 1))
    assert not isinstance(info.value, tokens.TokenNotYetValid)
    assert "expired at 2024-05-01T12:05:00" in str(info.value)


def test_not_yet_valid_with_leeway(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW)
    public = key.public_key()
    tokens.verify(public, token, now=NOW - timedelta(seconds=tokens.LEEWAY))
    with pytest.raises(tokens.TokenNotYetValid):
        tokens.verify(public, token, now=NOW - timedelta(seconds=tokens.LEEWAY + 1))
    # TokenNotYetValid is a TokenExpired: one except clause covers the validity period.
    with pytest.raises(tokens.TokenExpired):
        tokens.verify(public, token, now=NOW - timedelta(hours=1))


def test_wrong_issuer(key: rsa.RSAPrivateKey) -> None:
    token = tokens.issue(key, namespace="ns", name="disk", now=NOW, issuer="cdi-deployment")
    with pytest.raises(tokens.TokenWrongIssuer, match="cdi-deployment"):
        tokens.verify(key.public_key(), token, now=NOW)


def _claims(**overrides: Any) -> dict[str, Any]:
    iat = int(NOW.timestamp())
    claims: dict[str, Any] = {
        "iss": "cdi-apiserver", "iat": iat, "nbf": iat, "exp": iat + 300,
        "operation": "Upload", "name": "disk", "namespace": "ns",
        "resource": {"group": "", "version": "v1", "resource": "persistentvolumeclaims"},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize("overrides", [
    {"exp": None},
    {"exp": "tomorrow"},
    {"exp": True},
    {"exp": 1e300},
    {"nbf": "now"},
    {"name": 7},
    {"resource": "persistentvolumeclaims"},
    {"params": {"targetName": 1}},
])
def test_signed_but_garbled_claims_are_malformed(key: rsa.RSAPrivateKey,
                                                 overrides: dict[str, Any]) -> None:
    token = _sign(key, {"alg": "PS256"}, _claims(**overrides))
    with pytest.raises(tokens.TokenMalformed):
        tokens.verify(key.public_key(), token, now=NOW)


def test_crit_header_is_refused(key: rsa.RSAPrivateKey) -> None:
    token = _sign(key, {"alg": "PS256", "crit": ["exp"]}, _claims())
    with pytest.raises(tokens.TokenMalformed):
        tokens.verify(key.public_key(), token, now=NOW)


def test_hand_built_cdi_token_verifies(key: rsa.RSAPrivateKey) -> None:
    """A token as another JOSE implementation writes it (no typ, other key order)."""
    token = _sign(key, {"alg": "PS256"}, dict(reversed(_claims().items())))
    assert tokens.verify(key.public_key(), token, now=NOW).namespace == "ns"


# --- check --------------------------------------------------------------------------------------


def _verified(key: rsa.RSAPrivateKey, **claims: Any) -> tokens.Claims:
    return tokens.verify(key.public_key(), _sign(key, {"alg": "PS256"}, _claims(**claims)),
                         now=NOW)


def test_check_wrong_operation(key: rsa.RSAPrivateKey) -> None:
    claims = _verified(key, operation="Clone")
    with pytest.raises(tokens.TokenWrongOperation, match="'Clone', not 'Upload'"):
        tokens.check(claims, operation="Upload", namespace="ns", name="disk")


@pytest.mark.parametrize(("claims", "namespace", "name"), [
    ({}, "ns", "other"),
    ({}, "other", "disk"),
    ({"name": ""}, None, None),
    ({"namespace": None}, None, None),
    ({"resource": {"group": "snapshot.storage.k8s.io", "version": "v1",
                   "resource": "volumesnapshots"}}, "ns", "disk"),
    ({"resource": {"group": "", "version": "v2", "resource": "persistentvolumeclaims"}},
     None, None),
])
def test_check_wrong_resource(key: rsa.RSAPrivateKey, claims: dict[str, Any],
                              namespace: str | None, name: str | None) -> None:
    verified = _verified(key, **claims)
    with pytest.raises(tokens.TokenWrongResource):
        tokens.check(verified, operation="Upload", namespace=namespace, name=name)


# --- check_clone ----------------------------------------------------------------------------------


def _clone_claims(key: rsa.RSAPrivateKey, **kwargs: Any) -> tokens.Claims:
    issued: dict[str, Any] = {
        "namespace": "golden", "name": "fedora", "operation": tokens.CLONE,
        "params": {"targetNamespace": "vms", "targetName": "disk"}, "now": NOW, **kwargs}
    return tokens.verify(key.public_key(), tokens.issue(key, **issued), now=NOW)


def _check_clone(claims: tokens.Claims, **kwargs: Any) -> None:
    wanted: dict[str, Any] = {
        "source_namespace": "golden", "source_name": "fedora",
        "resource": tokens.PVC_RESOURCE, "target_namespace": "vms", "target_name": "disk",
        **kwargs}
    tokens.check_clone(claims, **wanted)


def test_check_clone_accepts_the_webhooks_token(key: rsa.RSAPrivateKey) -> None:
    _check_clone(_clone_claims(key))
    _check_clone(_clone_claims(key, resource=tokens.SNAPSHOT_RESOURCE),
                 resource=tokens.SNAPSHOT_RESOURCE)
    # As CDI, only the resource's name is compared, and a uid must be the target's.
    _check_clone(_clone_claims(key, resource=tokens.Resource("", "", "persistentvolumeclaims")))
    _check_clone(_clone_claims(key, params={"targetNamespace": "vms", "targetName": "disk",
                                            "uid": "u-1"}), target_uid="u-1")


@pytest.mark.parametrize(("issued", "wanted", "error", "message"), [
    ({"operation": tokens.UPLOAD}, {}, tokens.TokenWrongOperation,
     "token is for operation 'Upload', not 'Clone'"),
    ({"resource": tokens.SNAPSHOT_RESOURCE}, {}, tokens.TokenWrongResource,
     "token is for resource 'volumesnapshots', not 'persistentvolumeclaims'"),
    ({}, {"resource": tokens.SNAPSHOT_RESOURCE}, tokens.TokenWrongResource,
     "token is for resource 'persistentvolumeclaims', not 'volumesnapshots'"),
    ({"name": "secret"}, {}, tokens.TokenWrongResource,
     "token is for source golden/secret, not golden/fedora"),
    ({"namespace": "other"}, {}, tokens.TokenWrongResource,
     "token is for source other/fedora, not golden/fedora"),
    ({"params": {"targetNamespace": "vms", "targetName": "other"}}, {}, tokens.TokenWrongTarget,
     "token is for target vms/other, not vms/disk"),
    ({"params": {"targetNamespace": "x", "targetName": "disk"}}, {}, tokens.TokenWrongTarget,
     "token is for target x/disk, not vms/disk"),
    ({"params": None}, {}, tokens.TokenWrongTarget, "token is for target /, not vms/disk"),
    ({"params": {"targetNamespace": "vms", "targetName": "disk", "uid": "u-1"}},
     {"target_uid": "u-2"}, tokens.TokenWrongTarget, "token is for target uid u-1, not u-2"),
])
def test_check_clone_refusals(key: rsa.RSAPrivateKey, issued: dict[str, Any],
                              wanted: dict[str, Any], error: type[tokens.TokenError],
                              message: str) -> None:
    claims = _clone_claims(key, **issued)
    with pytest.raises(error) as e:
        _check_clone(claims, **wanted)
    assert str(e.value) == message

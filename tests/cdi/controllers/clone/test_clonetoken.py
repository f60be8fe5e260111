"""The clone token check, with real RSA keys: what passes, and the exact text of each refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from cdi.apiserver import kubeapi
from cdi.backends.port import Obj
from cdi.controllers.clone import clonetoken

CREATED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
PREFIX = "The clone doesn't meet the validation requirements: "


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def verifier(key: rsa.RSAPrivateKey) -> clonetoken.Verifier:
    return clonetoken.Verifier(key.public_key())


def webhook_token(key: rsa.RSAPrivateKey, **kwargs: Any) -> str:
    """A token shaped as ``datavolume-mutate`` issues it for golden/fedora -> vms/disk."""
    issued: dict[str, Any] = {
        "namespace": "golden", "name": "fedora", "operation": tokens.CLONE,
        "resource": tokens.PVC_RESOURCE, "now": CREATED - timedelta(seconds=1),
        "params": {"targetNamespace": "vms", "targetName": "disk"}, **kwargs}
    return tokens.issue(key, **issued)


def datavolume(token: str | None, *, created: str | None = "2026-03-01T12:00:00Z") -> Obj:
    meta: Obj = {"name": "disk", "namespace": "vms", "uid": "dv-uid"}
    if created is not None:
        meta["creationTimestamp"] = created
    if token is not None:
        meta["annotations"] = {tokens.ANN_CLONE_TOKEN: token}
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": meta,
            "spec": {"source": {"pvc": {"namespace": "golden", "name": "fedora"}}}}


def refusal(verifier: clonetoken.Verifier, dv: Obj, kind: str = "pvc",
            source: tuple[str, str] = ("golden", "fedora")) -> str | None:
    return verifier.refusal(dv, kind=kind, source_namespace=source[0], source_name=source[1])


def test_the_annotation_is_the_webhooks() -> None:
    assert tokens.ANN_CLONE_TOKEN == kubeapi.ANN_CLONE_TOKEN


def test_a_good_token_passes(key: rsa.RSAPrivateKey, verifier: clonetoken.Verifier) -> None:
    assert refusal(verifier, datavolume(webhook_token(key))) is None
    snapshot = webhook_token(key, resource=tokens.SNAPSHOT_RESOURCE)
    assert refusal(verifier, datavolume(snapshot), "snapshot") is None


def test_the_same_namespace_needs_no_token(verifier: clonetoken.Verifier) -> None:
    assert refusal(verifier, datavolume(None), source=("vms", "fedora")) is None
    assert refusal(verifier, datavolume("garbage"), source=("vms", "fedora")) is None


def test_validity_is_judged_when_the_datavolume_was_made(key: rsa.RSAPrivateKey,
                                                        verifier: clonetoken.Verifier) -> None:
    # Issued at creation, looked at hours later (the clone waited for its source): good.
    token = webhook_token(key)
    assert datetime.now(UTC) - CREATED > timedelta(minutes=5)
    assert refusal(verifier, datavolume(token)) is None
    # The same token on a DataVolume made after the token's 5 minutes: refused.
    late = datavolume(token, created="2026-03-01T12:05:10Z")
    assert refusal(verifier, late) == (
        PREFIX + "error verifying token: token expired at 2026-03-01T12:04:59+00:00")
    # Within the 10 s leeway it still passes.
    assert refusal(verifier, datavolume(token, created="2026-03-01T12:05:09Z")) is None
    # Issued long after the DataVolume was made: not valid then.
    future = webhook_token(key, now=CREATED + timedelta(minutes=1))
    assert refusal(verifier, datavolume(future)) == (
        PREFIX + "error verifying token: token is not valid before 2026-03-01T12:01:00+00:00")


def test_without_a_creation_time_the_token_is_judged_now(key: rsa.RSAPrivateKey,
                                                        verifier: clonetoken.Verifier) -> None:
    token = webhook_token(key)
    for created in (None, "yesterday"):
        assert refusal(verifier, datavolume(token, created=created)) == (
            PREFIX + "error verifying token: token expired at 2026-03-01T12:04:59+00:00")
    fresh = webhook_token(key, now=datetime.now(UTC))
    assert refusal(verifier, datavolume(fresh, created=None)) is None


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "clone token missing"),
    ("empty", "clone token missing"),
    ("expired", "error verifying token: token expired at 2026-03-01T11:05:00+00:00"),
    ("bad signature", "error verifying token: token signature is invalid"),
    ("garbage", "error verifying token: token is malformed: not three dot-separated parts"),
    ("wrong issuer", "error verifying token: token issuer is 'cdi-deployment', "
                     "not 'cdi-apiserver'"),
    ("wrong operation", "invalid token: token is for operation 'Upload', not 'Clone'"),
    ("wrong source", "invalid token: token is for source golden/other, not golden/fedora"),
    ("wrong source namespace", "invalid token: token is for source other/fedora, "
                               "not golden/fedora"),
    ("wrong resource", "invalid token: token is for resource 'volumesnapshots', "
                       "not 'persistentvolumeclaims'"),
    ("wrong target", "invalid token: token is for target vms/other, not vms/disk"),
    ("wrong target namespace", "invalid token: token is for target other/disk, not vms/disk"),
    ("wrong uid", "invalid token: token is for target uid other-uid, not dv-uid"),
])
def test_refusals(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey,
                  verifier: clonetoken.Verifier, case: str, message: str) -> None:
    token = {
        "missing": None,
        "empty": "",
        "expired": webhook_token(key, now=CREATED - timedelta(hours=1)),
        "bad signature": webhook_token(other_key),
        "garbage": "not-a-token",
        "wrong issuer": webhook_token(key, issuer="cdi-deployment"),
        "wrong operation": webhook_token(key, operation=tokens.UPLOAD),
        "wrong source": webhook_token(key, name="other"),
        "wrong source namespace": webhook_token(key, namespace="other"),
        "wrong resource": webhook_token(key, resource=tokens.SNAPSHOT_RESOURCE),
        "wrong target": webhook_token(key, params={"targetNamespace": "vms",
                                                   "targetName": "other"}),
        "wrong target namespace": webhook_token(key, params={"targetNamespace": "other",
                                                             "targetName": "disk"}),
        "wrong uid": webhook_token(key, params={"targetNamespace": "vms", "targetName": "disk",
                                                "uid": "other-uid"}),
    }[case]
    answer = refusal(verifier, datavolume(token))
    assert answer == PREFIX + message
    assert token is None or token == "" or token not in answer  # never echoes the token

"""The API server's Kubernetes face on a real TLS listener: the aggregated UploadTokenRequest
API behind a front proxy (client certificates made by the test, X-Remote-* headers,
authorization by the real RBAC evaluator standing in for SubjectAccessReview), and the
admission webhooks (AdmissionReview in, CDI's answers out)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from cdi.api.rbac_defaults import DEFAULTS
from cdi.apiserver import kubeapi, review
from cdi.apiserver.auth import UserInfo
from cdi.apiserver.rbac import Attributes, Decision, Policy
from cdi.backends.embedded.store import SQLiteStore
from tests.cdi.apiserver.test_rbac import binding, cluster_role, role, rule

CDI = "cdi.kubevirt.io"
UPLOAD = "upload.cdi.kubevirt.io"
FRONT_PROXY = "front-proxy-client"


def user(name: str) -> dict[str, str]:
    return {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": name}


POLICY = Policy([
    *DEFAULTS,
    role("uploader", "team", rule(["create"], [UPLOAD], ["uploadtokenrequests"])),
    binding("alice-uploads", "Role", "uploader", user("alice"), namespace="team"),
    # The seeds' chapter 8.6 cloner role, granted to alice in "golden" only.
    cluster_role("datavolume-cloner", rule(["*"], [CDI], ["datavolumes/source"])),
    binding("alice-clones", "ClusterRole", "datavolume-cloner", user("alice"),
            namespace="golden"),
])


class KubeApi:
    """The app on 127.0.0.1 with TLS, its own loop in a thread, a real SQLite store."""

    def __init__(self, tmp: Path, front_ca: trustme.CA, allowed: tuple[str, ...]) -> None:
        self.server_ca = trustme.CA()
        leaf = self.server_ca.issue_cert("127.0.0.1")
        self.cert, self.key = tmp / "server.pem", tmp / "server.key"
        self.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        self.ca_file = tmp / "ca.pem"
        self.server_ca.cert_pem.write_to_path(str(self.ca_file))
        self.config = kubeapi.RequestHeaderConfig.from_configmap({"data": {
            "requestheader-client-ca-file": front_ca.cert_pem.bytes().decode(),
            "requestheader-allowed-names": json.dumps(list(allowed)),
            "requestheader-username-headers": '["X-Remote-User"]',
            "requestheader-group-headers": '["X-Remote-Group"]',
            "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]'}})
        self.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.db = tmp / "db"
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> KubeApi:
        self._thread.start()
        self._ready.result(timeout=30)
        return self

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._setup())
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _setup(self) -> None:
        self.store = await SQLiteStore(self.db).__aenter__()
        app = kubeapi.create_kube_app(self.store, key=self.signing_key,
                                      reviewer=review.PolicyReviewer(POLICY),
                                      config=self.config)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        ctx = kubeapi.server_context(str(self.cert), str(self.key), self.config)
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"
        self._ready.set_result(None)

    def stop(self) -> None:
        async def down() -> None:
            await self.runner.cleanup()
            await self.store.__aexit__(None, None, None)
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


@pytest.fixture
def front_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def api(tmp_path: Path, front_ca: trustme.CA) -> Iterator[KubeApi]:
    server = KubeApi(tmp_path, front_ca, (FRONT_PROXY,)).start()
    try:
        yield server
    finally:
        server.stop()


def client_cert(tmp_path: Path, ca: trustme.CA, name: str) -> tuple[str, str]:
    leaf = ca.issue_cert(common_name=name)
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def token_request(api: KubeApi, *, cert: tuple[str, str] | None, ns: str = "team",
                  headers: dict[str, str] | None = None,
                  body: Any = None) -> requests.Response:
    return requests.post(
        f"{api.url}/apis/{UPLOAD}/v1beta1/namespaces/{ns}/uploadtokenrequests",
        json=body if body is not None else {
            "apiVersion": f"{UPLOAD}/v1beta1", "kind": "UploadTokenRequest",
            "metadata": {"name": "t"}, "spec": {"pvcName": "disk"}},
        headers=headers if headers is not None else {"X-Remote-User": "alice",
                                                     "X-Remote-Group": "system:authenticated"},
        cert=cert, verify=str(api.ca_file), timeout=10)


# --- the aggregated upload API ---------------------------------------------------------------


def test_a_front_proxied_user_with_rbac_gets_a_token(api: KubeApi, tmp_path: Path,
                                                     front_ca: trustme.CA) -> None:
    cert = client_cert(tmp_path, front_ca, FRONT_PROXY)
    r = token_request(api, cert=cert)
    assert r.status_code == 200, r.text
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    answer = r.json()
    assert answer["spec"] == {"pvcName": "disk"}
    assert answer["metadata"] == {"name": "t", "namespace": "team"}
    claims = tokens.verify(api.signing_key.public_key(), answer["status"]["token"])
    tokens.check(claims, operation=tokens.UPLOAD, namespace="team", name="disk")


DENIED = ('User "{user}" cannot create resource "uploadtokenrequests" in API group '
          '"upload.cdi.kubevirt.io" in the namespace "{ns}"')


@pytest.mark.parametrize(("case", "message"), [
    ("no client certificate", "request is not authenticated"),
    ("not the front proxy", "client certificate 'someone-else' is not an allowed front proxy"),
    ("no user header",
     "one of these headers required for authorization: ['X-Remote-User']"),
    ("no permission there", DENIED.format(user="alice", ns="elsewhere")),
    ("no permission", DENIED.format(user="mallory", ns="team")),
])
def test_upload_token_refusals(api: KubeApi, tmp_path: Path, front_ca: trustme.CA, case: str,
                               message: str) -> None:
    cert: tuple[str, str] | None = client_cert(tmp_path, front_ca, FRONT_PROXY)
    headers, ns = None, "team"
    if case == "no client certificate":
        cert = None
    elif case == "not the front proxy":
        cert = client_cert(tmp_path, front_ca, "someone-else")
    elif case == "no user header":
        headers = {"X-Remote-Group": "system:authenticated"}
    elif case == "no permission":
        headers = {"X-Remote-User": "mallory"}
    else:
        ns = "elsewhere"  # alice's Role is in "team" only
    r = token_request(api, cert=cert, headers=headers, ns=ns)
    assert (r.status_code, r.json()["message"], r.json()["reason"]) == (
        401, message, "Unauthorized")
    assert r.json()["kind"] == "Status"  # no UploadTokenRequest, no token


def test_a_certificate_of_another_ca_fails_the_handshake(api: KubeApi, tmp_path: Path) -> None:
    cert = client_cert(tmp_path, trustme.CA(), FRONT_PROXY)
    # TLS 1.3 reports the refused certificate after the client's handshake completes:
    # an alert, or the connection closed without an answer.  Either way no answer.
    with pytest.raises(requests.exceptions.ConnectionError):
        token_request(api, cert=cert)


def test_bad_bodies_and_discovery(api: KubeApi, tmp_path: Path, front_ca: trustme.CA) -> None:
    cert = client_cert(tmp_path, front_ca, FRONT_PROXY)
    r = token_request(api, cert=cert, body={"spec": {}})
    assert (r.status_code, r.json()["message"]) == (400, "spec.pvcName: Required value")
    group = requests.get(f"{api.url}/apis/{UPLOAD}", verify=str(api.ca_file), timeout=10)
    assert group.status_code == 200
    assert group.json()["preferredVersion"] == {"groupVersion": f"{UPLOAD}/v1beta1",
                                                "version": "v1beta1"}
    resources = requests.get(f"{api.url}/apis/{UPLOAD}/v1beta1", verify=str(api.ca_file),
                             timeout=10).json()
    assert resources["resources"][0]["name"] == "uploadtokenrequests"
    assert resources["resources"][0]["verbs"] == ["create"]
    assert requests.get(f"{api.url}/healthz", verify=str(api.ca_file), timeout=10).text == "OK"


def test_the_front_proxy_configuration_is_required() -> None:
    with pytest.raises(ValueError, match="front proxy is not configured"):
        kubeapi.RequestHeaderConfig.from_configmap({"data": {"client-ca-file": "x"}})
    config = kubeapi.RequestHeaderConfig.from_configmap(
        {"data": {"requestheader-client-ca-file": "PEM"}})
    assert (config.allowed_names, config.user_headers) == ((), ("X-Remote-User",))


# --- admission webhooks ----------------------------------------------------------------------


def admission_review(operation: str, obj: dict[str, Any], *, username: str = "alice",
                     resource: str = "datavolumes", version: str = "admission.k8s.io/v1",
                     old: dict[str, Any] | None = None) -> dict[str, Any]:
    req = {"uid": "0f6d-uid", "kind": {"group": CDI, "version": "v1beta1", "kind": "x"},
           "resource": {"group": CDI, "version": "v1beta1", "resource": resource},
           "namespace": obj["metadata"].get("namespace", "target"), "operation": operation,
           "userInfo": {"username": username, "groups": ["system:authenticated"]},
           "object": obj}
    if old is not None:
        req["oldObject"] = old
    return {"apiVersion": version, "kind": "AdmissionReview", "request": req}


def webhook(api: KubeApi, path: str, review_body: Any) -> dict[str, Any]:
    r = requests.post(f"{api.url}{path}", json=review_body, verify=str(api.ca_file),
                      timeout=10)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def clone_dv(source_ns: str | None, name: str = "copy") -> dict[str, Any]:
    pvc: dict[str, str] = {"name": "golden-disk"}
    if source_ns:
        pvc["namespace"] = source_ns
    return {"apiVersion": f"{CDI}/v1beta1", "kind": "DataVolume",
            "metadata": {"name": name, "namespace": "target"},
            "spec": {"source": {"pvc": pvc},
                     "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}


def test_validating_webhook_answers_with_cdis_text(api: KubeApi) -> None:
    bad = {"apiVersion": f"{CDI}/v1beta1", "kind": "DataVolume",
           "metadata": {"name": "bad", "namespace": "target"},
           "spec": {"source": {"blank": {}}}}
    answer = webhook(api, "/datavolume-validate",
                     admission_review("CREATE", bad, version="admission.k8s.io/v1beta1"))
    assert answer["apiVersion"] == "admission.k8s.io/v1beta1"
    response = answer["response"]
    assert (response["uid"], response["allowed"]) == ("0f6d-uid", False)
    assert response["status"]["code"] == 422
    assert response["status"]["message"] == " Missing Data volume PVC"
    assert response["status"]["details"]["causes"][0]["message"] == "Missing Data volume PVC"
    good = clone_dv("golden")
    assert webhook(api, "/datavolume-validate",
                   admission_review("CREATE", good))["response"] == {"uid": "0f6d-uid",
                                                                     "allowed": True}
    changed = clone_dv("golden")
    changed["spec"]["storage"]["resources"]["requests"]["storage"] = "2Gi"
    response = webhook(api, "/datavolume-validate",
                       admission_review("UPDATE", changed, old=good))["response"]
    assert (response["allowed"], response["status"]["message"]) == (
        False, " Cannot update DataVolume Spec")
    cron = {"apiVersion": f"{CDI}/v1beta1", "kind": "DataImportCron",
            "metadata": {"name": "c", "namespace": "target"},
            "spec": {"schedule": "not a schedule", "managedDataSource": "golden",
                     "template": {"spec": {
                         "source": {"registry": {"url": "docker://x/y"}},
                         "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}}}
    response = webhook(api, "/dataimportcron-validate",
                       admission_review("CREATE", cron, resource="dataimportcrons"))["response"]
    assert (response["allowed"], response["status"]["message"]) == (
        False, " Illegal cron schedule")


def test_malformed_reviews(api: KubeApi) -> None:
    answer = webhook(api, "/datavolume-validate", {"apiVersion": "admission.k8s.io/v1",
                                                   "kind": "AdmissionReview"})
    assert answer["response"] == {"allowed": False, "status": {
        "message": "AdmissionReview.Request is nil", "code": 400}}
    wrong = admission_review("CREATE", clone_dv("golden"), resource="pods")
    assert webhook(api, "/datavolume-mutate", wrong)["response"]["status"]["message"] == \
        "expect resource to be 'datavolumes'"
    r = requests.post(f"{api.url}/datavolume-validate", data="x",
                      headers={"Content-Type": "text/plain"}, verify=str(api.ca_file),
                      timeout=10)
    assert (r.status_code, r.json()["message"]) == (
        400, "contentType=text/plain, expect application/json")


def _patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return ops


def test_mutating_webhook_checks_the_clone_and_signs_a_token(api: KubeApi) -> None:
    # alice may clone from "golden" (the seeds' cloner role there): a token is added.
    response = webhook(api, "/datavolume-mutate",
                       admission_review("CREATE", clone_dv("golden")))["response"]
    assert response["allowed"] is True
    [op] = _patch(response)
    assert (op["op"], op["path"]) == ("add", "/metadata/annotations")
    claims = tokens.verify(api.signing_key.public_key(),
                           op["value"][kubeapi.ANN_CLONE_TOKEN])
    tokens.check(claims, operation=tokens.CLONE, namespace="golden", name="golden-disk")
    assert dict(claims.params) == {"targetNamespace": "target", "targetName": "copy"}

    # Not from "secret": CDI's refusal, on the field CDI names.
    response = webhook(api, "/datavolume-mutate",
                       admission_review("CREATE", clone_dv("secret")))["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert response["status"]["message"] == (
        " User alice has insufficient permissions in clone source namespace secret")
    assert response["status"]["details"]["causes"] == [{
        "reason": "FieldValueInvalid", "field": "spec.source.PVC.namespace",
        "message": "User alice has insufficient permissions in clone source namespace secret"}]

    # A source in the DataVolume's own namespace: the namespace is filled in, and the
    # token is still added (any user may clone inside a namespace).
    response = webhook(api, "/datavolume-mutate",
                       admission_review("CREATE", clone_dv(None)))["response"]
    ops = {op["path"]: op for op in _patch(response)}
    assert ops["/spec/source/pvc/namespace"] == {
        "op": "add", "path": "/spec/source/pvc/namespace", "value": "target"}
    assert kubeapi.ANN_CLONE_TOKEN in ops["/metadata/annotations"]["value"]

    # An update gets no new token; a blank DataVolume is left as it is.
    response = webhook(api, "/datavolume-mutate",
                       admission_review("UPDATE", clone_dv("golden"), old=clone_dv("golden")))
    assert response["response"] == {"uid": "0f6d-uid", "allowed": True}
    blank = {"apiVersion": f"{CDI}/v1beta1", "kind": "DataVolume",
             "metadata": {"name": "b", "namespace": "target"},
             "spec": {"source": {"blank": {}},
                      "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}
    assert webhook(api, "/datavolume-mutate",
                   admission_review("CREATE", blank))["response"]["allowed"] is True


def datasource(name: str, source: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{CDI}/v1beta1", "kind": "DataSource",
            "metadata": {"name": name, "namespace": "target"}, "spec": {"source": source}}


def by_ref(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{CDI}/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "copy", "namespace": "target"},
            "spec": {"sourceRef": {"kind": "DataSource", "name": name},
                     "storage": {"resources": {"requests": {"storage": "1Gi"}}}}}


def test_mutating_webhook_follows_a_datasource_reference(api: KubeApi) -> None:
    """A DataSource that refers to another: the check and the token are about the claim
    or snapshot at the end, as the clone controller resolves it."""
    for obj in (datasource("fedora", {"pvc": {"namespace": "golden", "name": "golden-disk"}}),
                datasource("latest", {"dataSource": {"name": "fedora"}}),
                datasource("snap", {"snapshot": {"namespace": "golden", "name": "s1"}}),
                datasource("latest-snap", {"dataSource": {"name": "snap"}}),
                datasource("db", {"pvc": {"namespace": "secret", "name": "db"}}),
                datasource("innocent", {"dataSource": {"name": "db"}}),
                datasource("loop", {"dataSource": {"name": "loop"}})):
        assert api.loop is not None
        asyncio.run_coroutine_threadsafe(api.store.create(obj), api.loop).result(timeout=10)

    for name, resource, source in (("latest", tokens.PVC_RESOURCE, "golden-disk"),
                                   ("latest-snap", tokens.SNAPSHOT_RESOURCE, "s1")):
        response = webhook(api, "/datavolume-mutate",
                           admission_review("CREATE", by_ref(name)))["response"]
        assert response["allowed"] is True
        [op] = _patch(response)
        claims = tokens.verify(api.signing_key.public_key(),
                               op["value"][kubeapi.ANN_CLONE_TOKEN])
        tokens.check(claims, operation=tokens.CLONE, namespace="golden", name=source,
                     resource=resource)
        assert dict(claims.params) == {"targetNamespace": "target", "targetName": "copy"}

    # alice may not clone from "secret", which "innocent" leads to.
    response = webhook(api, "/datavolume-mutate",
                       admission_review("CREATE", by_ref("innocent")))["response"]
    assert (response["allowed"], response["status"]["code"], response["status"]["message"]) \
        == (False, 422, " User alice has insufficient permissions in clone source "
                        "namespace secret")
    assert response["status"]["details"]["causes"] == [{
        "reason": "FieldValueInvalid", "field": "spec.source.PVC.namespace",
        "message": "User alice has insufficient permissions in clone source namespace secret"}]

    # A reference that leads nowhere clones nothing, so there is nothing to check or sign
    # (CDI's webhook sees no source either); the controller waits and copies nothing.
    for name in ("loop", "missing"):
        assert webhook(api, "/datavolume-mutate", admission_review("CREATE", by_ref(name))
                       )["response"] == {"uid": "0f6d-uid", "allowed": True}


def test_json_patch_of_nested_changes() -> None:
    old = {"a": {"b": 1, "c": [1]}, "gone": 1, "we/ird~": 1}
    new = {"a": {"b": 2, "c": [1, 2], "d": {}}, "we/ird~": 2}
    assert kubeapi.json_patch(old, new) == [
        {"op": "remove", "path": "/gone"},
        {"op": "replace", "path": "/a/b", "value": 2},
        {"op": "replace", "path": "/a/c", "value": [1, 2]},
        {"op": "add", "path": "/a/d", "value": {}},
        {"op": "replace", "path": "/we~1ird~0", "value": 2}]
    assert kubeapi.json_patch(old, old) == []


def test_store_reviewer_sends_a_subject_access_review() -> None:
    sent: list[dict[str, Any]] = []

    class Answering:  # the Kubernetes API at our boundary: it fills status and stores nothing
        async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
            sent.append(obj)
            allowed = obj["spec"]["user"] == "alice"
            return {**obj, "status": {"allowed": allowed,
                                      "reason": "" if allowed else "no RBAC policy matched"}}

    reviewer = review.StoreReviewer(Answering())  # type: ignore[arg-type]
    ask = Attributes(UserInfo("alice", ("dev",)), "create", "team", UPLOAD,
                     "uploadtokenrequests")
    assert asyncio.run(reviewer.review(ask, {"scopes": ["a"]})) == Decision(True, "")
    assert sent[0] == {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": "alice", "groups": ["dev"], "extra": {"scopes": ["a"]},
                 "resourceAttributes": {"namespace": "team", "verb": "create",
                                        "group": UPLOAD, "resource": "uploadtokenrequests"}}}
    other = Attributes(UserInfo("bob"), "create", "team", UPLOAD, "uploadtokenrequests")
    assert asyncio.run(reviewer.review(other)) == Decision(False, "no RBAC policy matched")
    answers = asyncio.run(review.snapshot(reviewer, [ask, ask, other]))
    assert len(sent) == 4  # the repeated question is asked once
    assert answers.authorize(ask).allowed and not answers.authorize(other).allowed
    assert answers.authorize(Attributes(UserInfo("alice"), "delete")) == Decision(
        False, "not reviewed")


def test_the_server_context_wants_tls_1_2(tmp_path: Path, front_ca: trustme.CA) -> None:
    api = KubeApi(tmp_path, front_ca, ())
    ctx = kubeapi.server_context(str(api.cert), str(api.key), api.config)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_OPTIONAL

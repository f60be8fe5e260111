"""`cdi controller` checks clone tokens: a DataVolume cloning across namespaces proceeds with
the webhook's token and stops, with CDI's reason and the exact message, without a good one."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from cdi.apiserver import kubeapi
from cdi.apiserver.rbac import Attributes, Decision
from cdi.backends.port import Obj
from cdi.cli import controller
from cdi.cli.main import main
from cdi.controllers.clone.pods import CLONE_FOR
from cdi.manifests import render, values, workloads
from tests.cdi.backends.kube.conftest import store_on
from tests.cdi.backends.kube.test_controller import eventually
from tests.support.fakekube import FakeKube

PREFIX = "The clone doesn't meet the validation requirements: "
SC = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
      "metadata": {"name": "local"}, "provisioner": "kubernetes.io/no-provisioner"}


class AllowAll:
    """A SubjectAccessReview that says yes (the requester may clone from golden)."""

    async def review(self, attributes: Attributes,
                     extra: Mapping[str, Sequence[str]] | None = None) -> Decision:
        return Decision(True)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def clone_dv(name: str, *, namespace: str = "vms", token: str | None = None) -> Obj:
    dv: Obj = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
               "metadata": {"name": name, "namespace": namespace},
               "spec": {"source": {"pvc": {"namespace": "golden", "name": "fedora"}},
                        "pvc": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                                "resources": {"requests": {"storage": "1Gi"}}}}}
    if token is not None:
        dv["metadata"]["annotations"] = {tokens.ANN_CLONE_TOKEN: token}
    return dv


def token(key: rsa.RSAPrivateKey, target: str, **kwargs: Any) -> str:
    issued: dict[str, Any] = {
        "namespace": "golden", "name": "fedora", "operation": tokens.CLONE,
        "params": {"targetNamespace": "vms", "targetName": target}, **kwargs}
    return tokens.issue(key, **issued)


async def through_the_webhook(fake: FakeKube, key: rsa.RSAPrivateKey, dv: Obj) -> Obj:
    """DV as ``datavolume-mutate`` admits it: with the token it signs."""
    async with store_on(fake) as store:
        admit = kubeapi.datavolume_mutator(store, AllowAll(), key)
        response = await admit({
            "uid": "1", "operation": "CREATE", "resource": kubeapi.DATAVOLUMES,
            "namespace": dv["metadata"]["namespace"], "name": dv["metadata"]["name"],
            "object": dv, "userInfo": {"username": "alice", "groups": ["dev"]}})
    assert response["allowed"] is True
    ops = json.loads(base64.b64decode(response["patch"]))
    [annotations] = [op["value"] for op in ops if op["path"] == "/metadata/annotations"]
    return {**dv, "metadata": {**dv["metadata"], "annotations": annotations}}


def running(fake: FakeKube, name: str, namespace: str = "vms") -> Obj | None:
    dv = fake.get("DataVolume", name, namespace) or {}
    return next((c for c in (dv.get("status") or {}).get("conditions") or []
                 if c["type"] == "Running" and c.get("reason")), None)


def warnings(fake: FakeKube, name: str) -> list[tuple[str, str]]:
    found = fake.call(lambda: [o for (kind, _, _), o in fake.objects.items() if kind == "Event"])
    return [(e["reason"], e["message"]) for e in found
            if e["involvedObject"]["name"] == name and e["type"] == "Warning"]


def test_clones_across_namespaces_need_the_webhooks_token(fake: FakeKube, tmp_path: Path,
                                                          key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    expired_at = datetime.fromtimestamp(int(long_ago.timestamp()) + 300, UTC).isoformat()
    refused = {
        "missing": (None, "clone token missing"),
        "expired": (token(key, "expired", now=long_ago),
                    f"error verifying token: token expired at {expired_at}"),
        "bad-signature": (token(other, "bad-signature"),
                          "error verifying token: token signature is invalid"),
        "wrong-source": (token(key, "wrong-source", name="secret"),
                         "invalid token: token is for source golden/secret, not golden/fedora"),
        "wrong-target": (token(key, "somewhere-else"),
                         "invalid token: token is for target vms/somewhere-else, "
                         "not vms/wrong-target"),
        "wrong-operation": (token(key, "wrong-operation", operation=tokens.UPLOAD),
                            "invalid token: token is for operation 'Upload', not 'Clone'"),
    }
    options = controller.Options(
        kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"), identity="replica-1",
        apiserver_public_key=tokens.public_key_pem(key).decode())

    async def scenario() -> None:
        stop = asyncio.Event()
        running_controller = asyncio.ensure_future(controller.run(options, stop))
        fake.put(SC)
        fake.put({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                  "metadata": {"name": "fedora", "namespace": "golden"},
                  "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                           "resources": {"requests": {"storage": "1Gi"}}}})
        fake.patch("PersistentVolumeClaim", "fedora", "golden",
                   {"status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}, status=True)
        fake.put(await through_the_webhook(fake, key, clone_dv("good")))
        fake.put(clone_dv("same-namespace", namespace="golden"))  # no token needed
        for name, (tok, _) in refused.items():
            fake.put(clone_dv(name, token=tok))

        # The webhook's token: the clone goes on (a copy across namespaces).
        target = await eventually(lambda: fake.get("PersistentVolumeClaim", "good", "vms"))
        assert target["metadata"]["annotations"]["k8s.io/CloneRequest"] == "golden/fedora"
        assert await eventually(lambda: fake.get("PersistentVolumeClaim", "same-namespace",
                                                 "golden"))
        # Without a good token nothing is made; the DataVolume says why, once, in an event.
        for name, (_, why) in refused.items():
            condition = await eventually(functools.partial(running, fake, name))
            assert (condition["status"], condition["reason"], condition["message"]) == (
                "False", "CloneValidationFailed", PREFIX + why), name
            assert (fake.get("DataVolume", name, "vms") or {})["status"]["phase"] == "Pending"
            assert await eventually(functools.partial(warnings, fake, name)) == [
                ("CloneValidationFailed", PREFIX + why)]
            assert fake.get("PersistentVolumeClaim", name, "vms") is None
        # Nothing anywhere for them: no claim, no upload or source pod, no snapshot.
        made = fake.call(lambda: [
            (kind, name, (obj["metadata"].get("labels") or {}).get(CLONE_FOR, ""),
             [r["name"] for r in obj["metadata"].get("ownerReferences") or []])
            for (kind, _, name), obj in fake.objects.items()
            if kind in ("Pod", "VolumeSnapshot", "PersistentVolumeClaim", "Secret")])
        for dv in refused:
            assert [m for m in made if dv in m[1] or m[2] == f"vms.{dv}" or dv in m[3]] == []
        stop.set()
        await asyncio.wait_for(running_controller, 10)

    asyncio.run(scenario())


def datasource(name: str, source: Obj) -> Obj:
    return {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataSource",
            "metadata": {"name": name, "namespace": "vms"}, "spec": {"source": source}}


def test_a_datasource_chain_gets_a_token_the_controller_accepts(
        fake: FakeKube, tmp_path: Path, key: rsa.RSAPrivateKey) -> None:
    """sourceRef -> "latest" -> "fedora" -> golden/fedora: the webhook signs for the claim
    at the end, and the controller, resolving the chain the same way, clones with it.  A
    chain re-pointed after admission leads elsewhere, which the token does not cover."""
    options = controller.Options(
        kubeconfig=fake.kubeconfig(tmp_path / "kubeconfig"), identity="replica-1",
        apiserver_public_key=tokens.public_key_pem(key).decode())

    def by_ref(name: str, ref: str) -> Obj:
        dv = clone_dv(name)
        dv["spec"] = {**dv["spec"], "sourceRef": {"kind": "DataSource", "name": ref}}
        del dv["spec"]["source"]
        return dv

    async def scenario() -> None:
        fake.put(SC)
        for name in ("fedora", "secret"):
            fake.put({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                      "metadata": {"name": name, "namespace": "golden"},
                      "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                               "resources": {"requests": {"storage": "1Gi"}}}})
            fake.patch("PersistentVolumeClaim", name, "golden",
                       {"status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}},
                       status=True)
        for ds in (datasource("fedora", {"pvc": {"namespace": "golden", "name": "fedora"}}),
                   datasource("secret", {"pvc": {"namespace": "golden", "name": "secret"}}),
                   datasource("latest", {"dataSource": {"name": "fedora"}}),
                   datasource("moving", {"dataSource": {"name": "fedora"}})):
            fake.put(ds)
        chained = await through_the_webhook(fake, key, by_ref("chained", "latest"))
        claims = tokens.verify(key.public_key(),
                               chained["metadata"]["annotations"][tokens.ANN_CLONE_TOKEN])
        assert (claims.namespace, claims.name, claims.resource) == (
            "golden", "fedora", tokens.PVC_RESOURCE)
        fake.put(chained)
        fake.put(await through_the_webhook(fake, key, by_ref("moved", "moving")))
        fake.patch("DataSource", "moving", "vms",
                   {"spec": {"source": {"dataSource": {"name": "secret"}}}})

        stop = asyncio.Event()
        running_controller = asyncio.ensure_future(controller.run(options, stop))
        target = await eventually(lambda: fake.get("PersistentVolumeClaim", "chained", "vms"))
        assert target["metadata"]["annotations"]["k8s.io/CloneRequest"] == "golden/fedora"
        condition = await eventually(functools.partial(running, fake, "moved"))
        assert (condition["status"], condition["reason"], condition["message"]) == (
            "False", "CloneValidationFailed", PREFIX + "invalid token: token is for source "
                                                       "golden/fedora, not golden/secret")
        assert fake.get("PersistentVolumeClaim", "moved", "vms") is None
        stop.set()
        await asyncio.wait_for(running_controller, 10)

    asyncio.run(scenario())


def test_the_controller_deployment_gets_the_public_key() -> None:
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render.objects(values.load(), "cdi")}
    deployment = objs[("Deployment", workloads.CONTROLLER)]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["APISERVER_PUBLIC_KEY"]["valueFrom"] == {"secretKeyRef": {
        "name": workloads.SIGNING_KEY_SECRET, "key": "id_rsa.pub"}}
    # The same key the upload proxy verifies upload tokens with.
    proxy = objs[("Deployment", workloads.UPLOADPROXY)]["spec"]["template"]["spec"]
    assert {e["name"]: e for e in proxy["containers"][0]["env"]}["APISERVER_PUBLIC_KEY"] == \
        env["APISERVER_PUBLIC_KEY"]


@pytest.mark.parametrize(("value", "message"), [
    ("", "Error: APISERVER_PUBLIC_KEY is empty: the controller cannot verify clone tokens "
         "(it comes from Secret cdi-api-signing-key)"),
    ("not a key", "Error: APISERVER_PUBLIC_KEY is not an RSA public key: "),
])
def test_the_command_needs_the_public_key(value: str, message: str) -> None:
    result = CliRunner().invoke(main, ["controller"], env={"APISERVER_PUBLIC_KEY": value})
    assert result.exit_code == 1
    assert result.output.startswith(message), result.output

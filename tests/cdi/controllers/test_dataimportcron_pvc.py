"""DataImportCrons that clone a PVC, on the real SQLite store: the source claim's UID is
the digest, and the cron's service account must be allowed to clone it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdi.controllers import cronpvc
from cdi.controllers.dataimportcron import DataImportCronController
from tests.cdi.controllers.test_dataimportcron import NS, Env, at, cond, run

SOURCE_NS = "images"


class Authorizer:
    """The API server's answer at our boundary: who asked, and a switch."""

    def __init__(self) -> None:
        self.allow = False
        self.asked: list[tuple[Any, ...]] = []

    async def __call__(self, user: str, groups: tuple[str, ...], source_ns: str,
                       source: str, target_ns: str) -> tuple[bool, str]:
        self.asked.append((user, groups, source_ns, source, target_ns))
        return self.allow, "" if self.allow else "no"


async def source_claim(env: Env, uid_hint: str) -> str:
    claim = await env.store.create({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "golden", "namespace": SOURCE_NS, "labels": {"v": uid_hint}},
        "spec": {"resources": {"requests": {"storage": "1Gi"}}}, "status": {"phase": "Bound"}})
    return str(claim["metadata"]["uid"])


async def pvc_cron(env: Env, **spec: Any) -> None:
    await env.store.create({
        "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
        "metadata": {"name": "fedora", "namespace": NS},
        "spec": {"schedule": "0 * * * *", "managedDataSource": "fedora-ds",
                 "template": {"spec": {
                     "source": {"pvc": {"namespace": SOURCE_NS, "name": "golden"}},
                     "storage": {"resources": {"requests": {"storage": "1Gi"}}}}},
                 **spec}})


def test_the_claims_uid_is_the_digest_and_the_service_account_must_be_allowed(
        tmp_path: Path) -> None:
    authorizer = Authorizer()

    async def test(env: Env) -> None:
        env.controller = DataImportCronController(env.store, clock=lambda: env.now,
                                                  poller=env.poll,
                                                  authorize_clone=authorizer)
        uid = await source_claim(env, "1")
        await pvc_cron(env, serviceAccountName="image-builder")
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert cron["metadata"]["annotations"][
            "cdi.kubevirt.io/storage.import.sourceDesiredDigest"] == f"uid:{uid}"
        assert env.polls == []  # no registry was asked
        assert cond(cron, "Progressing") == ("False", "NotAuthorized",
                                             "Not authorized to create DataVolume")
        assert "currentImports" not in cron["status"]
        assert authorizer.asked == [(
            f"system:serviceaccount:{NS}:image-builder",
            ("system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"),
            SOURCE_NS, "golden", NS)]

        # Allowed now: the clone DataVolume is made, named after the UID.
        authorizer.allow = True
        await env.reconcile()
        name = "fedora-ds-" + uid[:12]
        dv = await env.get("DataVolume", name)
        assert dv["spec"]["source"] == {"pvc": {"namespace": SOURCE_NS, "name": "golden"}}
        await env.finish(name)
        await env.reconcile()
        ds = await env.get("DataSource", "fedora-ds")
        assert ds["spec"]["source"] == {"pvc": {"namespace": NS, "name": name}}

        # The source made anew under the same name is a new version at the next run.
        await env.store.delete("PersistentVolumeClaim", "golden", SOURCE_NS)
        uid2 = await source_claim(env, "2")
        env.now = at(11, 0)
        await env.reconcile()
        assert await env.exists("DataVolume", "fedora-ds-" + uid2[:12])

        # Gone: the poll fails with the claim's name, and the last import stays served.
        await env.store.delete("PersistentVolumeClaim", "golden", SOURCE_NS)
        env.now = at(12, 0)
        assert await env.reconcile() == 30.0
        events = (await env.store.list("Event", NS)).items
        assert any(e["reason"] == "PollFailed" and e["message"] ==
                   'Failed to poll the source digest: persistentvolumeclaims "golden" not '
                   f'found in namespace {SOURCE_NS}' for e in events)
        assert (await env.get("DataSource", "fedora-ds"))["spec"]["source"]["pvc"]["name"] \
            == name
    run(test, tmp_path)


def test_without_an_authorizer_or_a_schedule(tmp_path: Path) -> None:
    async def test(env: Env) -> None:
        await source_claim(env, "1")
        await pvc_cron(env, schedule="")
        await env.reconcile()
        cron = await env.get("DataImportCron", "fedora")
        assert "cdi.kubevirt.io/storage.import.sourceDesiredDigest" not in \
            cron["metadata"].get("annotations", {})  # an empty schedule never polls
        assert cronpvc.service_account(cron)[0] == f"system:serviceaccount:{NS}:default"
    run(test, tmp_path)

"""An upload server's certificate, and the deadline that keeps the pod from outliving it.

An upload server pod gets its serving certificate (and the client CAs it
accepts) once, when it is made.  CDI's upload controller therefore gives it a
deadline: ``DEADLINE`` (RFC 3339) is now + ``certConfig.server.duration -
renewBefore``.  A server still waiting for its upload then stops, saying
``{"message": "Deadline Passed", "deadlinePassed": true}``; an upload under
way is never cut, the server stops only once it is over
(``importer/upload/uploads.py``).  The controller deletes such a pod, marks the
claim as CDI does (``storage.pod.phase`` empty, ``storage.pod.ready``
``false``), and the next reconcile makes a new pod with a new certificate.
That is not a failure: the DataVolume goes back to ``UploadScheduled``, then
``UploadReady``, and an ``UploadServerRecycled`` event says why.

CDI's server exits 0 after the deadline; ours exits 1, so a kubelet (or the
embedded pod runner) restarts it under ``restartPolicy: OnFailure`` and the
message is in the container's ``lastState``.  ``deadline_passed`` reads both.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging

from cdi.api import errors, pki
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers import events, importpod

log = logging.getLogger(__name__)

A = importpod.ANN
RECYCLED = "UploadServerRecycled"  # the event's reason
# The Running condition while the pod is replaced: CDI's message; our reason, as the
# kubelet's ("Error": the server exits 1) would read as a failure.
RUNNING = ("False", "DeadlinePassed", "Deadline Passed")


@dataclasses.dataclass(frozen=True)
class UploadTLS:
    """What upload servers get for mutual TLS: a signer for their serving
    certificates, the signer of the clients (the proxy) they accept, and how long
    one may wait for its upload before it is replaced (None: as long as it takes)."""

    signer: pki.Signer
    client_signer: pki.Signer
    deadline_after: datetime.timedelta | None = None

    @property
    def client_ca_pem(self) -> bytes:
        """The client CAs an upload server accepts: the client signer's bundle (the
        current CA and, during a rotation, the one before; cdi/cli/certrotation.py)."""
        return self.client_signer.bundle_pem

    def deadline(self, now: datetime.datetime | None = None) -> str | None:
        """``DEADLINE`` for an upload server made NOW (RFC 3339, UTC), or None."""
        if self.deadline_after is None:
            return None
        now = now or datetime.datetime.now(datetime.UTC)
        return (now + self.deadline_after).strftime("%Y-%m-%dT%H:%M:%SZ")


async def fresh_secret(store: ObjectStore, pvc: Obj, tls: UploadTLS) -> str:
    """A new certificate Secret (and the Service) for the claim's next upload server pod:
    one left by an earlier pod is replaced, so a new pod never starts with an old
    certificate.  Returns the Secret's name."""
    secret = importpod.upload_tls_secret(pvc, tls.signer, tls.client_ca_pem)
    meta = secret["metadata"]
    try:
        await store.delete("Secret", meta["name"], meta["namespace"])
    except errors.NotFound:
        pass
    for obj in (secret, importpod.upload_service(pvc)):
        try:
            await store.create(obj)
        except errors.AlreadyExists:
            pass
    return str(meta["name"])


def deadline_passed(pod: Obj) -> bool:
    """Whether POD's upload server stopped at its deadline without an upload: CDI's
    termination message, in the container's current state or (restarted) its last."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (cs.get("state"), cs.get("lastState")):
            message = ((state or {}).get("terminated") or {}).get("message") or ""
            try:
                data = json.loads(message)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("deadlinePassed") is True:
                return True
    return False


async def old_scratch(store: ObjectStore, pvc: Obj) -> bool:
    """Whether, with no upload pod, the claim's scratch claim is still an earlier pod's
    (being deleted with it).  A new pod waits until it is gone: on a cluster the garbage
    collector would otherwise delete it under the new pod."""
    meta = pvc["metadata"]
    try:
        scratch = await store.get("PersistentVolumeClaim", importpod.scratch_name(meta["name"]),
                                  meta["namespace"])
    except errors.NotFound:
        return False
    return any(r.get("kind") == "Pod" for r in scratch["metadata"].get("ownerReferences") or [])


async def recycle(store: ObjectStore, pvc: Obj, pod: Obj, *, report_on: Obj) -> None:
    """Delete POD, a server past its deadline, with its certificate and scratch claim, and
    mark the claim as CDI does; the next reconcile makes a new pod.  The event goes on
    REPORT_ON (the DataVolume, or a bare claim).  A pod being deleted is left alone."""
    meta = pod["metadata"]
    if meta.get("deletionTimestamp"):
        return
    ns, name = meta["namespace"], meta["name"]
    claim = pvc["metadata"]
    log.info("RECYCLE upload server %s/%s: deadline passed without an upload", ns, name)
    for kind, obj_name in (("Pod", name), ("Secret", name),
                           ("PersistentVolumeClaim", importpod.scratch_name(claim["name"]))):
        try:
            await store.delete(kind, obj_name, ns)
        except errors.NotFound:
            pass
    await store.patch("PersistentVolumeClaim", claim["name"], ns, {"metadata": {"annotations": {
        A + "storage.pod.phase": "", A + "storage.pod.ready": "false",
        A + "storage.condition.running.reason": RUNNING[1],
        A + "storage.condition.running.message": RUNNING[2]}}})
    await events.emit(store, report_on, reason=RECYCLED, message=(
        f"Upload server {name} reached its deadline without an upload; "
        "starting a new one with a new certificate"))

"""DataImportCrons whose template clones a PVC: the claim's UID is the digest.

A golden image can come from another volume rather than a registry: the
cron's template has ``source.pvc``.  CDI polls such a cron in its controller
on the schedule, with ``uid:<the source claim's UID>`` as the digest, so a
claim deleted and made again under the same name is a new version, imported
as ``<managedDataSource>-<first 12 characters of the UID>``.

Each new import is a clone, and the cron acts for its service account
(``spec.serviceAccountName``, default ``default``): before the DataVolume is
created that account must be allowed to clone from the source namespace, as a
user would be (``create`` on ``datavolumes/source``, or ``pods``).  A refusal
leaves no DataVolume and says so on the cron: Progressing False,
``NotAuthorized`` "Not authorized to create DataVolume".  The check itself is
given to the controller (``CloneAuthorizer``) by whoever wires it, since the
authorizer lives with the API server (embedded RBAC, or SubjectAccessReviews
on a cluster).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cdi.api import errors as api_errors
from cdi.backends.port import Obj, ObjectStore
from cdi.controllers.cronpoll import PollError

REASON_NOT_AUTHORIZED = "NotAuthorized"
MSG_NOT_AUTHORIZED = "Not authorized to create DataVolume"
DEFAULT_SERVICE_ACCOUNT = "default"

# (user, groups, source namespace, source name, target namespace) -> (allowed, reason)
CloneAuthorizer = Callable[[str, tuple[str, ...], str, str, str], Awaitable[tuple[bool, str]]]


def source(cron: Obj) -> dict[str, Any] | None:
    """The template's ``source.pvc``, if the cron clones a claim."""
    spec = (((cron.get("spec") or {}).get("template") or {}).get("spec") or {})
    pvc = (spec.get("source") or {}).get("pvc")
    return pvc if isinstance(pvc, dict) and pvc.get("name") else None


def source_namespace(cron: Obj) -> str:
    pvc = source(cron) or {}
    return str(pvc.get("namespace") or cron["metadata"]["namespace"])


async def poll_digest(store: ObjectStore, cron: Obj) -> str:
    """``uid:<UID>`` of the source claim; PollError if it does not exist."""
    pvc = source(cron) or {}
    name, ns = str(pvc.get("name") or ""), source_namespace(cron)
    try:
        claim = await store.get("PersistentVolumeClaim", name, ns)
    except api_errors.NotFound:
        raise PollError(f'persistentvolumeclaims "{name}" not found in namespace {ns}') \
            from None
    return f"uid:{claim['metadata']['uid']}"


def service_account(cron: Obj) -> tuple[str, tuple[str, ...]]:
    """The user and groups Kubernetes gives the cron's service account."""
    ns = cron["metadata"]["namespace"]
    name = (cron.get("spec") or {}).get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT
    return (f"system:serviceaccount:{ns}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"))


async def authorized(authorize: CloneAuthorizer | None, cron: Obj) -> tuple[bool, str]:
    """May the cron's service account clone its source into the cron's namespace?"""
    pvc = source(cron)
    if pvc is None or authorize is None:
        return True, ""
    user, groups = service_account(cron)
    return await authorize(user, groups, source_namespace(cron), str(pvc["name"]),
                           cron["metadata"]["namespace"])

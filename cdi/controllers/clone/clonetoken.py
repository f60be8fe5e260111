"""The clone token check: the controller clones across namespaces only what admission allowed.

The controller may read every namespace; whether the *creator* of a
DataVolume may read its source namespace is decided once, by admission.  On a
cluster that is the ``datavolume-mutate`` webhook (``cdi.apiserver.kubeapi``),
which records its verdict on the DataVolume as a signed token
(``cdi.kubevirt.io/storage.clone.token``: operation ``Clone``, the source,
``params.targetNamespace``/``targetName``, issuer ``cdi-apiserver``, 5
minutes).  A DataVolume that reached the cluster past the webhook (not yet
registered, deleted, a changed ``failurePolicy``, a restore straight into
etcd) has no valid token, and this check keeps the controller from copying
data for it, as CDI's DataVolume clone controllers do with their
``token.Validator`` (``pkg/controller/datavolume/*clone*``, ``pkg/token``).

What is checked, as CDI (``ValidateCloneTokenDV``, ``validateTokenData``):

- only clones from *another* namespace; a same-namespace clone needs no token;
- the signature (the apiserver's public key), the issuer and the validity
  period, with 10 s of leeway;
- operation ``Clone``, the source's namespace and name, ``persistentvolumeclaims``
  or ``volumesnapshots`` as the source is a claim or a snapshot, and the
  DataVolume's namespace and name as the target.

One difference: the validity period is judged at the DataVolume's
``creationTimestamp`` (set by kube-apiserver, so nobody can forge it), not at
the time the controller looks.  The webhook issues the token as the object is
created, so a genuine token is always valid then, however long the clone waits
for its source; a token copied onto a DataVolume created after it expired is
refused.  CDI instead checks the short token on first sight and re-signs it
as a 10-year "extended" token bound to the DataVolume's UID, which needs the
private key in the controller; judging at creation time gives the same
protection with the public key alone, and a DataVolume the controller first
sees more than 5 minutes after its creation (controller down) still clones.

A refusal stops the clone (no target claim, no snapshot, no source pod):
Running False with reason ``CloneValidationFailed`` and CDI's message "The
clone doesn't meet the validation requirements: <why>", where <why> keeps
CDI's wording: "clone token missing", "error verifying token: ..." or
"invalid token: ...".  The same text goes out once as a Warning event.

``cdi serve`` does not check tokens (the controller gets no key there): its
REST API runs the same clone authorization in-process on every write
(``cdi.apiserver.admission``), and there is no way around it.
"""

from __future__ import annotations

import datetime
import logging

from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import tokens
from cdi.backends.port import Obj

log = logging.getLogger(__name__)

REASON = "CloneValidationFailed"
MESSAGE = "The clone doesn't meet the validation requirements: {}"
MISSING = "clone token missing"

_RESOURCES = {"pvc": tokens.PVC_RESOURCE, "snapshot": tokens.SNAPSHOT_RESOURCE}


def _created(dv: Obj) -> datetime.datetime | None:
    """The DataVolume's ``creationTimestamp``; None if it has none we can read."""
    stamp = dv["metadata"].get("creationTimestamp")
    if not isinstance(stamp, str):
        return None
    try:
        created = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return created if created.tzinfo is not None else created.replace(tzinfo=datetime.UTC)


class Verifier:
    """Checks DataVolumes' clone tokens with the apiserver's public key."""

    def __init__(self, public_key: rsa.RSAPublicKey, *, leeway: float = tokens.LEEWAY) -> None:
        self._key = public_key
        self._leeway = leeway

    def refusal(self, dv: Obj, *, kind: str, source_namespace: str,
                source_name: str) -> str | None:
        """Why DV may not clone the ``kind`` ("pvc" or "snapshot") source; None if it may.

        The answer is the condition's and event's message; it never holds the token.
        """
        meta = dv["metadata"]
        if source_namespace == meta["namespace"]:
            return None
        token = (meta.get("annotations") or {}).get(tokens.ANN_CLONE_TOKEN)
        if not token:
            return MESSAGE.format(MISSING)
        # Judged when the DataVolume was created (see the module docstring); a
        # DataVolume without a readable creationTimestamp is judged now.
        try:
            claims = tokens.verify(self._key, token, now=_created(dv), leeway=self._leeway)
        except tokens.TokenError as e:
            return MESSAGE.format(f"error verifying token: {e}")
        try:
            tokens.check_clone(claims, source_namespace=source_namespace,
                               source_name=source_name, resource=_RESOURCES[kind],
                               target_namespace=meta["namespace"], target_name=meta["name"],
                               target_uid=str(meta.get("uid") or ""))
        except tokens.TokenError as e:
            return MESSAGE.format(f"invalid token: {e}")
        return None

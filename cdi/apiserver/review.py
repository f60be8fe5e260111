"""Asking whether someone may do something, when the answer lives elsewhere.

The embedded API server decides authorization itself (``rbac.Policy``).  On
Kubernetes the cluster decides: the API server (the aggregated
UploadTokenRequest API, the admission webhooks) sends a
``SubjectAccessReview`` and reads ``status.allowed``, as CDI's apiserver does.
Both are ``AccessReviewer``s here, so the request handlers in ``kubeapi`` do
not care which answers them, and tests can use the real RBAC evaluator where
no Kubernetes API server can run.

``snapshot`` turns an ``AccessReviewer`` into the synchronous ``rbac.Authorizer``
that the clone check (``admission.can_clone``) asks: the few questions that
check can ask are reviewed up front, concurrently, and answered from that.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from cdi.apiserver import admission, rbac
from cdi.apiserver.auth import UserInfo
from cdi.apiserver.rbac import Attributes, Decision, Policy
from cdi.backends.port import ObjectStore

SAR_API_VERSION = "authorization.k8s.io/v1"


class AccessReviewer(Protocol):
    async def review(self, attributes: Attributes,
                     extra: Mapping[str, Sequence[str]] | None = None) -> Decision: ...


@dataclasses.dataclass
class PolicyReviewer:
    """Answers from an RBAC policy held here (the embedded backend, and tests)."""

    policy: Policy

    async def review(self, attributes: Attributes,
                     extra: Mapping[str, Sequence[str]] | None = None) -> Decision:
        if attributes.user.is_admin:
            return Decision(True)
        return self.policy.authorize(attributes)


@dataclasses.dataclass
class LivePolicyReviewer:
    """Answers from the RBAC objects in the store as they are now (``cdi serve``)."""

    store: ObjectStore

    async def review(self, attributes: Attributes,
                     extra: Mapping[str, Sequence[str]] | None = None) -> Decision:
        return await PolicyReviewer(await rbac.load(self.store)).review(attributes, extra)


def access_review(attributes: Attributes,
                  extra: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The ``SubjectAccessReview`` that asks ATTRIBUTES' question."""
    spec: dict[str, Any] = {"user": attributes.user.name,
                            "groups": list(attributes.user.groups)}
    if extra:
        spec["extra"] = {k: list(v) for k, v in extra.items()}
    if attributes.resource_request:
        resource = {"namespace": attributes.namespace, "verb": attributes.verb,
                    "group": attributes.api_group, "resource": attributes.resource,
                    "subresource": attributes.subresource, "name": attributes.name}
        spec["resourceAttributes"] = {k: v for k, v in resource.items() if v}
    else:
        spec["nonResourceAttributes"] = {"path": attributes.path, "verb": attributes.verb}
    return {"apiVersion": SAR_API_VERSION, "kind": "SubjectAccessReview", "spec": spec}


@dataclasses.dataclass
class StoreReviewer:
    """Creates a ``SubjectAccessReview`` through the backend (Kubernetes answers in its
    status, and stores nothing)."""

    store: ObjectStore

    async def review(self, attributes: Attributes,
                     extra: Mapping[str, Sequence[str]] | None = None) -> Decision:
        answer = await self.store.create(access_review(attributes, extra))
        status = answer.get("status") or {}
        reason = str(status.get("reason") or status.get("evaluationError") or "")
        return Decision(bool(status.get("allowed")) and not status.get("denied"), reason)


@dataclasses.dataclass(frozen=True)
class Answers:
    """A synchronous authorizer over questions reviewed beforehand; any other question is
    refused (a caller asking something unforeseen gets no accidental permission)."""

    decisions: Mapping[Attributes, Decision]

    def authorize(self, attributes: Attributes) -> Decision:
        return self.decisions.get(attributes, Decision(False, "not reviewed"))


async def snapshot(reviewer: AccessReviewer, questions: Iterable[Attributes]) -> Answers:
    """Review QUESTIONS concurrently; the answers, as an ``rbac.Authorizer``."""
    asked = list(dict.fromkeys(questions))
    decisions = await asyncio.gather(*(reviewer.review(q) for q in asked))
    return Answers(dict(zip(asked, decisions, strict=True)))


def clone_questions(user: UserInfo, source_namespace: str, source_name: str
                    ) -> list[Attributes]:
    """Every question ``admission.can_clone`` may ask about one source."""
    def create(resource: str, subresource: str = "", group: str = "") -> Attributes:
        return Attributes(user, "create", source_namespace, group, resource, subresource,
                          source_name)
    return [create("datavolumes", "source", "cdi.kubevirt.io"), create("pods"),
            create("pvcs")]


async def clone_allowed(reviewer: AccessReviewer, user: str, groups: tuple[str, ...],
                        source_namespace: str, source_name: str, target_namespace: str
                        ) -> tuple[bool, str]:
    """``admission.can_clone`` with REVIEWER's answers: (allowed, reason)."""
    answers = await snapshot(reviewer, clone_questions(UserInfo(user, groups),
                                                       source_namespace, source_name))
    return admission.can_clone(answers, user, groups, source_namespace, source_name,
                               target_namespace)

"""The API server as it runs on Kubernetes: the aggregated upload API and the webhooks.

On a cluster, Kubernetes' own API server stores and serves the CDI kinds; what
it needs from us is what CDI's ``cdi-apiserver`` gives it:

- **``upload.cdi.kubevirt.io/v1beta1``, aggregated.**  kube-apiserver proxies
  ``POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/<ns>/uploadtokenrequests``
  to us with a front-proxy client certificate and the requester in
  ``X-Remote-User``/``X-Remote-Group``/``X-Remote-Extra-*``.  Only a
  certificate that verifies against the ``requestheader-client-ca-file`` of
  ``kube-system/extension-apiserver-authentication`` (and, if that lists
  ``requestheader-allowed-names``, carries one of them as its common name)
  authenticates the headers; then a SubjectAccessReview asks whether the
  requester may ``create`` ``uploadtokenrequests`` in the namespace.  Refusals
  are 401 with the reason, as CDI answers.  Discovery (``/apis``, the group,
  the version) and ``/healthz`` are open.
- **Admission webhooks** (``admission.k8s.io/v1`` AdmissionReview):
  ``/datavolume-validate`` and ``/dataimportcron-validate`` run the rules of
  ``cdi.api.validation``; ``/datavolume-mutate`` defaults a clone source's
  namespace, checks the clone-source permission with SubjectAccessReviews
  (``admission.can_clone``) and, on create, adds a signed clone token
  (``cdi.kubevirt.io/storage.clone.token``).  Refusals carry CDI's text and
  causes with code 422; a malformed review is answered 400.

TLS always: the server certificate is the apiserver's, client certificates
are optional at the handshake (webhook calls come without one) and required by
the upload API.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from cdi.api import errors, tokens, validation
from cdi.apiserver import admission, review
from cdi.apiserver.auth import UserInfo
from cdi.apiserver.rbac import Attributes
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)

GROUP = "upload.cdi.kubevirt.io"
VERSIONS = ("v1beta1", "v1alpha1")
RESOURCE = "uploadtokenrequests"
AUTH_CONFIGMAP = ("kube-system", "extension-apiserver-authentication")
ANN_CLONE_TOKEN = "cdi.kubevirt.io/storage.clone.token"  # noqa: S105 (a name)
DATAVOLUMES = {"group": "cdi.kubevirt.io", "version": "v1beta1", "resource": "datavolumes"}
DATAIMPORTCRONS = {"group": "cdi.kubevirt.io", "version": "v1beta1",
                   "resource": "dataimportcrons"}


@dataclasses.dataclass(frozen=True)
class RequestHeaderConfig:
    """Who may vouch for a requester, and in which headers (the front proxy's settings)."""

    client_ca_pem: str
    allowed_names: tuple[str, ...] = ()
    user_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)

    @classmethod
    def from_configmap(cls, cm: Obj) -> RequestHeaderConfig:
        data = cm.get("data") or {}

        def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            text = data.get(key)
            if not text:
                return default
            value = json.loads(text)
            return tuple(str(v) for v in value) if isinstance(value, list) else default
        ca = str(data.get("requestheader-client-ca-file") or "")
        if not ca:
            raise ValueError("extension-apiserver-authentication has no "
                             "requestheader-client-ca-file: the front proxy is not configured")
        return cls(ca, names("requestheader-allowed-names", ()),
                   names("requestheader-username-headers", cls.user_headers),
                   names("requestheader-group-headers", cls.group_headers),
                   names("requestheader-extra-headers-prefix", cls.extra_prefixes))


def server_context_without_cert(config: RequestHeaderConfig) -> ssl.SSLContext:
    """TLS for the apiserver, its certificate still to load: a client certificate, when
    one is sent, must verify against the front proxy's CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=config.client_ca_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def server_context(cert_file: str, key_file: str, config: RequestHeaderConfig) -> ssl.SSLContext:
    """TLS for the apiserver with our certificate (see ``server_context_without_cert``)."""
    ctx = server_context_without_cert(config)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


# --- the aggregated upload API -------------------------------------------------------------


def _peer_common_name(request: web.Request) -> str | None:
    """The verified client certificate's common name; None without a verified one."""
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    if not peer:
        return None
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _requester(request: web.Request, config: RequestHeaderConfig
               ) -> tuple[UserInfo, dict[str, list[str]]] | str:
    """The user the front proxy vouches for, or why there is none."""
    name = _peer_common_name(request)
    if name is None:
        return "request is not authenticated"
    if config.allowed_names and name not in config.allowed_names:
        return f"client certificate {name!r} is not an allowed front proxy"
    users = next((request.headers.getall(h) for h in config.user_headers
                  if h in request.headers), None)
    if not users:
        return f"one of these headers required for authorization: {list(config.user_headers)}"
    groups = next((request.headers.getall(h) for h in config.group_headers
                   if h in request.headers), [])
    extra: dict[str, list[str]] = {}
    for key, value in request.headers.items():
        for prefix in config.extra_prefixes:
            if key.lower().startswith(prefix.lower()):
                extra.setdefault(key[len(prefix):].lower(), []).append(value)
    return UserInfo(users[0], tuple(groups)), extra


def _discovery(version: str | None) -> dict[str, Any]:
    if version is None:
        versions = [{"groupVersion": f"{GROUP}/{v}", "version": v} for v in VERSIONS]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": versions,
                "preferredVersion": versions[0]}
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{GROUP}/{version}",
            "resources": [{"name": RESOURCE, "singularName": "uploadtokenrequest",
                           "namespaced": True, "kind": "UploadTokenRequest",
                           "verbs": ["create"]}]}


def _status(code: int, message: str, reason: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    return web.json_response(body, status=code)


def upload_token_handler(key: rsa.RSAPrivateKey, reviewer: review.AccessReviewer,
                         config: RequestHeaderConfig
                         ) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        version, ns = request.match_info["version"], request.match_info["namespace"]
        who = _requester(request, config)
        if isinstance(who, str):
            log.info("upload token refused: %s", who)
            return _status(401, who, "Unauthorized")
        user, extra = who
        decision = await reviewer.review(
            Attributes(user, "create", ns, GROUP, RESOURCE), extra)
        if not decision.allowed:
            message = (f'User "{user.name}" cannot create resource "{RESOURCE}" in API group '
                       f'"{GROUP}" in the namespace "{ns}"')
            if decision.reason:
                message += f": {decision.reason}"
            log.info("upload token refused: %s", message)
            return _status(401, message, "Unauthorized")
        try:
            body = await request.json()
        except ValueError as e:
            return _status(400, f"request body is not JSON: {e}", "BadRequest")
        pvc = ((body.get("spec") or {}) if isinstance(body, dict) else {}).get("pvcName")
        if not isinstance(pvc, str) or not pvc:
            return _status(400, "spec.pvcName: Required value", "BadRequest")
        answer = dict(body)
        answer.setdefault("apiVersion", f"{GROUP}/{version}")
        answer.setdefault("kind", "UploadTokenRequest")
        answer["metadata"] = {**(body.get("metadata") or {}), "namespace": ns}
        answer["status"] = {"token": tokens.issue(key, namespace=ns, name=pvc)}
        log.info("upload token issued to %s for %s/%s", user.name, ns, pvc)
        return web.json_response(answer, headers={"X-Content-Type-Options": "nosniff"})
    return handle


# --- admission webhooks --------------------------------------------------------------------

Admit = Callable[[Obj], Awaitable[Obj]]


def _allowed() -> Obj:
    return {"allowed": True}


def _error(message: str) -> Obj:
    return {"allowed": False, "status": {"message": message, "code": 400}}


def _rejected(causes: Sequence[Mapping[str, Any]]) -> Obj:
    # CDI joins the causes' messages, each after a space.
    message = "".join(f" {c.get('message', '')}" for c in causes)
    return {"allowed": False, "status": {"message": message, "code": 422,
                                         "details": {"causes": [dict(c) for c in causes]}}}


def _invalid(e: errors.APIError) -> Obj:
    return _rejected(e.causes or [{"reason": "FieldValueInvalid", "message": e.message}])


def _object(req: Obj, key: str = "object") -> dict[str, Any] | None:
    obj = req.get(key)
    if not isinstance(obj, dict):
        return None
    obj = copy.deepcopy(obj)
    meta = obj.setdefault("metadata", {})
    if not meta.get("namespace") and req.get("namespace"):
        meta["namespace"] = req["namespace"]
    if not meta.get("name") and req.get("name"):
        meta["name"] = req["name"]
    return obj


def validator(resource: Mapping[str, str]) -> Admit:
    """A validating webhook for RESOURCE: ``cdi.api.validation`` on create and update."""
    async def admit(req: Obj) -> Obj:
        if req.get("resource") != resource:
            return _error(f"expect resource to be '{resource['resource']}'")
        new = _object(req)
        if new is None:
            return _error("AdmissionReview.Request.Object is missing")
        old = _object(req, "oldObject") if req.get("operation") == "UPDATE" else None
        try:
            validation.validate(new, old)
        except errors.APIError as e:
            return _invalid(e)
        return _allowed()
    return admit


def json_patch(old: Any, new: Any, path: str = "") -> list[Obj]:
    """RFC 6902 operations turning OLD into NEW (objects recursed, anything else replaced)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[Obj] = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
            elif old[key] != value:
                ops.extend(json_patch(old[key], value, f"{path}/{_escape(key)}"))
        return ops
    return [] if old == new else [{"op": "replace", "path": path, "value": new}]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def datavolume_mutator(store: ObjectStore, reviewer: review.AccessReviewer,
                       key: rsa.RSAPrivateKey) -> Admit:
    """CDI's ``datavolume-mutate``: source namespace, clone permission, clone token."""
    async def admit(req: Obj) -> Obj:
        if req.get("resource") != DATAVOLUMES:
            return _error(f"expect resource to be '{DATAVOLUMES['resource']}'")
        dv = _object(req)
        if dv is None:
            return _error("AdmissionReview.Request.Object is missing")
        if dv["metadata"].get("deletionTimestamp"):
            return _allowed()
        original = req["object"]
        modified = copy.deepcopy(original)
        validation.default_source_namespace(modified)
        source = await admission.clone_source_of(store, dv)
        if source is not None:
            info = req.get("userInfo") or {}
            user = UserInfo(str(info.get("username") or ""),
                            tuple(str(g) for g in info.get("groups") or ()))
            answers = await review.snapshot(reviewer, review.clone_questions(
                user, source.namespace, source.name))
            target_ns = str(dv["metadata"].get("namespace") or "")
            allowed, reason = admission.can_clone(answers, user.name, user.groups,
                                                  source.namespace, source.name, target_ns,
                                                  snapshot=source.snapshot)
            if not allowed:
                return _invalid(admission.clone_refused(dv, reason))
            if req.get("operation") == "CREATE":
                clone_token = tokens.issue(
                    key, namespace=source.namespace, name=source.name, operation=tokens.CLONE,
                    resource=tokens.SNAPSHOT_RESOURCE if source.snapshot
                    else tokens.PVC_RESOURCE,
                    params={"targetNamespace": target_ns,
                            "targetName": str(dv["metadata"].get("name") or "")})
                modified.setdefault("metadata", {}).setdefault("annotations", {})[
                    ANN_CLONE_TOKEN] = clone_token
        ops = json_patch(original, modified)
        if not ops:
            return _allowed()
        return {"allowed": True, "patchType": "JSONPatch",
                "patch": base64.b64encode(json.dumps(ops).encode()).decode()}
    return admit


def admission_handler(admit: Admit) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The AdmissionReview envelope around ADMIT: same apiVersion and uid back."""
    async def handle(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _status(400, f"contentType={request.content_type}, expect "
                                "application/json", "BadRequest")
        body: Any = None
        try:
            body = await request.json()
        except ValueError as e:
            response = _error(f"AdmissionReview is not JSON: {e}")
        else:
            req = body.get("request") if isinstance(body, dict) else None
            if isinstance(req, dict):
                response = {"uid": req.get("uid", ""), **await admit(req)}
            else:
                response = _error("AdmissionReview.Request is nil")
        api_version = body.get("apiVersion") if isinstance(body, dict) else None
        return web.json_response({"apiVersion": api_version or "admission.k8s.io/v1",
                                  "kind": "AdmissionReview", "response": response})
    return handle


def create_kube_app(store: ObjectStore, *, key: rsa.RSAPrivateKey,
                    reviewer: review.AccessReviewer,
                    config: RequestHeaderConfig) -> web.Application:
    app = web.Application(client_max_size=4 << 20)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def apis(_: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                  "groups": [_discovery(None)]})

    async def group(_: web.Request) -> web.Response:
        return web.json_response(_discovery(None))

    async def version(request: web.Request) -> web.Response:
        v = request.match_info["version"]
        if v not in VERSIONS:
            return _status(404, f"the server could not find {GROUP}/{v}", "NotFound")
        return web.json_response(_discovery(v))

    token = upload_token_handler(key, reviewer, config)

    async def upload_token(request: web.Request) -> web.Response:
        if request.match_info["version"] not in VERSIONS:
            return _status(404, "not found", "NotFound")
        return await token(request)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/apis", apis)
    app.router.add_get(f"/apis/{GROUP}", group)
    app.router.add_get(f"/apis/{GROUP}/{{version}}", version)
    app.router.add_post(f"/apis/{GROUP}/{{version}}/namespaces/{{namespace}}/{RESOURCE}",
                        upload_token)
    app.router.add_post("/datavolume-validate", admission_handler(validator(DATAVOLUMES)))
    app.router.add_post("/dataimportcron-validate",
                        admission_handler(validator(DATAIMPORTCRONS)))
    app.router.add_post("/datavolume-mutate",
                        admission_handler(datavolume_mutator(store, reviewer, key)))
    return app

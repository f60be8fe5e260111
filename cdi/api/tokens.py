"""CDI's upload and clone tokens: short-lived PS256 JWTs naming one PVC.

The API server issues a token for an ``UploadTokenRequest`` (and, in the
``datavolume-mutate`` webhook, for clones); the upload proxy verifies upload
tokens with the public half of the same key and learns from them which PVC the
upload is for, and the clone controller verifies clone tokens
(:func:`check_clone`, used by ``cdi.controllers.clone.clonetoken``).  Both sides must
agree on the exact format, and tokens issued by KubeVirt CDI must verify here
(and ours there), so this module pins CDI's shape:

- compact JWS, header ``{"alg": "PS256", "typ": "JWT"}``, RSA 2048 key,
  RSASSA-PSS with SHA-256, MGF1-SHA-256 and a salt as long as the digest
  (RFC 7518 section 3.5);
- claims ``iss`` (``cdi-apiserver``), ``iat``, ``nbf``, ``exp`` (NumericDate,
  5 minutes after ``iat`` by default) and CDI's private claims ``operation``
  (``Upload`` or ``Clone``), ``name``, ``namespace``, ``resource``
  (``{"group": "", "version": "v1", "resource": "persistentvolumeclaims"}``)
  and, for clones, ``params``.

Verification allows :data:`LEEWAY` seconds of clock skew on ``exp``, ``nbf``
and ``iat`` (CDI's proxy allows 10 s), so a token issued on a host whose clock
is a little ahead is not refused.  It is implemented on ``cryptography``
directly: it is about a hundred lines and needs no JWT library.

Tokens are bearer secrets: no error message here contains a token or any part
of one, and callers must not log them either.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "ANN_CLONE_TOKEN",
    "CLONE",
    "ISSUER",
    "LEEWAY",
    "PVC_RESOURCE",
    "SNAPSHOT_RESOURCE",
    "UPLOAD",
    "Claims",
    "Resource",
    "TokenBadSignature",
    "TokenError",
    "TokenExpired",
    "TokenMalformed",
    "TokenNotYetValid",
    "TokenWrongIssuer",
    "TokenWrongOperation",
    "TokenWrongResource",
    "TokenWrongTarget",
    "check",
    "check_clone",
    "generate_key",
    "issue",
    "load_key",
    "load_public_key",
    "public_key_pem",
    "verify",
]

ISSUER = "cdi-apiserver"
"""The issuer of upload tokens and of the short clone tokens (CDI's apiserver)."""

UPLOAD = "Upload"
CLONE = "Clone"

ANN_CLONE_TOKEN = "cdi.kubevirt.io/storage.clone.token"  # noqa: S105 - an annotation's name
"""Where the webhook puts a DataVolume's clone token (CDI's ``AnnCloneToken``)."""

LEEWAY = 10
"""Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``, as CDI's proxy."""

DEFAULT_LIFETIME = 300
"""Seconds a token is valid, as CDI (5 minutes)."""

KEY_SIZE = 2048

_ALGORITHM = "PS256"
_HEADER = {"alg": _ALGORITHM, "typ": "JWT"}
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
# Tokens are a few hundred bytes; anything far bigger is not one of ours.
_MAX_TOKEN = 16 * 1024


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


# --- errors -------------------------------------------------------------------------------------


class TokenError(Exception):
    """Base of the tree; ``str(e)`` is safe to show and to log (it never holds the token).

    TokenError
    +-- TokenMalformed        not a compact JWS with JSON header and claims we understand
    +-- TokenBadSignature     not signed PS256 by the expected key
    +-- TokenExpired          past ``exp`` (+ leeway)
    |   +-- TokenNotYetValid  before ``nbf`` / ``iat`` (- leeway)
    +-- TokenWrongIssuer      signed by our key but for another issuer
    +-- TokenWrongOperation   valid, but for another operation (``check``)
    +-- TokenWrongResource    valid, but for another kind of object or object (``check``)
    +-- TokenWrongTarget      a valid clone token, but for another target (``check_clone``)
    """


class TokenMalformed(TokenError):
    pass


class TokenBadSignature(TokenError):
    pass


class TokenExpired(TokenError):
    pass


class TokenNotYetValid(TokenExpired):
    pass


class TokenWrongIssuer(TokenError):
    pass


class TokenWrongOperation(TokenError):
    pass


class TokenWrongResource(TokenError):
    pass


class TokenWrongTarget(TokenError):
    pass


# --- claims -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """A Kubernetes GroupVersionResource, as CDI's ``resource`` claim."""

    group: str
    version: str
    resource: str

    def __str__(self) -> str:
        return f"{self.group}/{self.version}/{self.resource}" if self.group else (
            f"{self.version}/{self.resource}")


PVC_RESOURCE = Resource("", "v1", "persistentvolumeclaims")
SNAPSHOT_RESOURCE = Resource("snapshot.storage.k8s.io", "v1", "volumesnapshots")


@dataclass(frozen=True)
class Claims:
    """The claims of a verified token."""

    issuer: str
    operation: str
    namespace: str
    name: str
    resource: Resource
    expires: datetime
    not_before: datetime | None = None
    issued_at: datetime | None = None
    params: Mapping[str, str] = field(default_factory=dict)


# --- keys ---------------------------------------------------------------------------------------


def generate_key(path: Path) -> None:
    """Create an RSA 2048 private key in PEM at ``path`` (mode 0600); no-op if it exists.

    The key is written to a temporary file (``O_EXCL``, 0600) and hard-linked to
    ``path`` once complete (``link`` fails if ``path`` exists), so a concurrent
    reader never sees half a key and concurrent callers end up with one key.
    """
    if path.exists():
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # mkstemp opens with O_CREAT | O_EXCL and mode 0600, under a unique name.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA private key in the PEM file at ``path``."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key")
    return key


def load_public_key(data: bytes) -> rsa.RSAPublicKey:
    """An RSA public key from PEM (``SubjectPublicKeyInfo``, as CDI's ``APISERVER_PUBLIC_KEY``)."""
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def public_key_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    """The public half of ``key`` in PEM, for the upload proxy."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


# --- issue and verify ---------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: str, what: str) -> bytes:
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise TokenMalformed(f"token is malformed: {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenMalformed(f"token is malformed: {what} is not base64url") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise TokenMalformed(f"token is malformed: {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenMalformed(f"token is malformed: {what} is not a JSON object")
    return value


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode()


def issue(
    key: rsa.RSAPrivateKey,
    *,
    namespace: str,
    name: str,
    operation: str = UPLOAD,
    lifetime: int = DEFAULT_LIFETIME,
    now: datetime | None = None,
    resource: Resource = PVC_RESOURCE,
    params: Mapping[str, str] | None = None,
    issuer: str = ISSUER,
) -> str:
    """A signed token for ``operation`` on the object ``namespace``/``name``, valid ``lifetime`` s.

    ``iat`` and ``nbf`` are ``now`` (whole seconds), ``exp`` is ``now + lifetime``.
    ``resource``, ``params`` and ``issuer`` are for clone tokens; uploads keep
    the defaults.
    """
    if not namespace or not name:
        raise ValueError("a token needs a namespace and a name")
    if lifetime <= 0:
        raise ValueError(f"lifetime must be positive, not {lifetime}")
    issued = int((now or datetime.now(UTC)).timestamp())
    claims: dict[str, Any] = {
        "iss": issuer,
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime,
        "operation": operation,
        "name": name,
        "namespace": namespace,
        "resource": {"group": resource.group, "version": resource.version,
                     "resource": resource.resource},
    }
    if params:
        claims["params"] = dict(params)
    signing_input = f"{_b64encode(_json(_HEADER))}.{_b64encode(_json(claims))}"
    signature = key.sign(signing_input.encode("ascii"), _pss(), hashes.SHA256())
    return f"{signing_input}.{_b64encode(signature)}"


def _date(claims: Mapping[str, Any], name: str, *, required: bool) -> datetime | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenMalformed(f"token is malformed: claim {name} is not a NumericDate")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise TokenMalformed(f"token is malformed: claim {name} is out of range") from None


def _text(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str):
        raise TokenMalformed(f"token is malformed: claim {name} is not a string")
    return value


def _claims(payload: Mapping[str, Any]) -> Claims:
    raw_resource = payload.get("resource", {})
    raw_params = payload.get("params", {})
    if not isinstance(raw_resource, dict) or not isinstance(raw_params, dict):
        raise TokenMalformed("token is malformed: resource or params is not an object")
    resource = Resource(*(_text(raw_resource, part) for part in ("group", "version", "resource")))
    if not all(isinstance(v, str) for v in raw_params.values()):
        raise TokenMalformed("token is malformed: params are not strings")
    expires = _date(payload, "exp", required=True)
    assert expires is not None
    return Claims(
        issuer=_text(payload, "iss"),
        operation=_text(payload, "operation"),
        namespace=_text(payload, "namespace"),
        name=_text(payload, "name"),
        resource=resource,
        expires=expires,
        not_before=_date(payload, "nbf", required=False),
        issued_at=_date(payload, "iat", required=False),
        params=dict(raw_params),
    )


def verify(
    public_key: rsa.RSAPublicKey,
    token: str,
    *,
    now: datetime | None = None,
    issuer: str = ISSUER,
    leeway: float = LEEWAY,
) -> Claims:
    """The claims of ``token`` once its signature, issuer and validity period check out.

    Raises :class:`TokenMalformed`, :class:`TokenBadSignature`,
    :class:`TokenWrongIssuer`, :class:`TokenExpired` or
    :class:`TokenNotYetValid`, in that order of checking.
    """
    if len(token) > _MAX_TOKEN:
        raise TokenMalformed("token is malformed: too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenMalformed("token is malformed: not three dot-separated parts")
    header = _json_object(_b64decode(parts[0], "header"), "header")
    if header.get("alg") != _ALGORITHM:
        raise TokenBadSignature(f"token is not signed with {_ALGORITHM}")
    if "crit" in header:
        raise TokenMalformed("token is malformed: critical header extensions are not supported")
    payload_bytes = _b64decode(parts[1], "payload")
    signature = _b64decode(parts[2], "signature")
    try:
        public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"), _pss(),
                          hashes.SHA256())
    except InvalidSignature:
        raise TokenBadSignature("token signature is invalid") from None
    claims = _claims(_json_object(payload_bytes, "payload"))
    if claims.issuer != issuer:
        raise TokenWrongIssuer(f"token issuer is {claims.issuer!r}, not {issuer!r}")
    current = now or datetime.now(UTC)
    skew = timedelta(seconds=leeway)
    if current > claims.expires + skew:
        raise TokenExpired(f"token expired at {claims.expires.isoformat()}")
    for start in (claims.not_before, claims.issued_at):
        if start is not None and current < start - skew:
            raise TokenNotYetValid(f"token is not valid before {start.isoformat()}")
    return claims


def check(
    claims: Claims,
    *,
    operation: str,
    namespace: str | None = None,
    name: str | None = None,
    resource: Resource = PVC_RESOURCE,
) -> None:
    """Refuse ``claims`` unless they are for ``operation`` on ``resource`` ``namespace/name``.

    ``namespace`` or ``name`` left ``None`` accepts any non-empty value: the
    upload proxy learns the PVC from the token itself.  Raises
    :class:`TokenWrongOperation` or :class:`TokenWrongResource`.
    """
    if claims.operation != operation:
        raise TokenWrongOperation(
            f"token is for operation {claims.operation!r}, not {operation!r}")
    if claims.resource != resource:
        raise TokenWrongResource(f"token is for resource {claims.resource}, not {resource}")
    if not claims.namespace or not claims.name:
        raise TokenWrongResource("token names no namespace or no name")
    want_namespace = claims.namespace if namespace is None else namespace
    want_name = claims.name if name is None else name
    if (claims.namespace, claims.name) != (want_namespace, want_name):
        raise TokenWrongResource(
            f"token is for {claims.namespace}/{claims.name}, not {want_namespace}/{want_name}")


def check_clone(
    claims: Claims,
    *,
    source_namespace: str,
    source_name: str,
    resource: Resource,
    target_namespace: str,
    target_name: str,
    target_uid: str = "",
) -> None:
    """Refuse ``claims`` unless they allow cloning the source into the target, as CDI.

    CDI's ``validateTokenData``: operation ``Clone``, the source's namespace and
    name, the resource's name (``persistentvolumeclaims`` or ``volumesnapshots``;
    group and version are not compared), ``params.targetNamespace`` and
    ``params.targetName``, and ``params.uid`` when the token has one.  Raises
    :class:`TokenWrongOperation`, :class:`TokenWrongResource` or
    :class:`TokenWrongTarget`; the messages name what the token is for, never
    the token.
    """
    if claims.operation != CLONE:
        raise TokenWrongOperation(f"token is for operation {claims.operation!r}, not {CLONE!r}")
    if claims.resource.resource != resource.resource:
        raise TokenWrongResource(
            f"token is for resource {claims.resource.resource!r}, not {resource.resource!r}")
    if (claims.namespace, claims.name) != (source_namespace, source_name):
        raise TokenWrongResource(f"token is for source {claims.namespace}/{claims.name}, "
                                 f"not {source_namespace}/{source_name}")
    target = (claims.params.get("targetNamespace", ""), claims.params.get("targetName", ""))
    if target != (target_namespace, target_name):
        raise TokenWrongTarget(f"token is for target {target[0]}/{target[1]}, "
                               f"not {target_namespace}/{target_name}")
    uid = claims.params.get("uid", "")
    if uid and uid != target_uid:
        raise TokenWrongTarget(f"token is for target uid {uid}, not {target_uid}")

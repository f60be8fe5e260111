"""Bearer-token authentication: who is asking, for every request but ``GET /healthz``.

``cdi serve`` makes one random admin token and writes it to a 0600 file;
whoever can read that file is ``system:admin`` in group ``system:masters``,
which RBAC never restricts (as Kubernetes' privileged group).  More tokens,
each naming a user (``--user alice --group dev``) or a service account
(``system:serviceaccount:<ns>:<sa>``), are made through ``/auth/v1/tokens``,
which only ``system:masters`` may use, and kept by :class:`TokenRegistry` in a
0600 file in the data dir as SHA-256 digests: the file never holds a usable
token, and a token is shown once, when it is made.

The header is parsed strictly (``Authorization: Bearer <token>``, one space,
nothing after the token).  The admin token is compared with
:func:`hmac.compare_digest`; other tokens are hashed and the digest compared
with every registered digest the same way, so timing reveals neither.  A
missing, malformed or unknown token is the same 401 ``Status``: the client
learns nothing about which part was wrong, and no token is ever logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cdi.api import errors

log = logging.getLogger(__name__)

UNAUTHENTICATED = {("GET", "/healthz"), ("HEAD", "/healthz")}
TOKENS_PATH = "/auth/v1/tokens"
ADMIN_ONLY_PREFIX = "/auth/"  # paths no RBAC rule can grant: system:masters only

MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED_GROUP = "system:unauthenticated"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
SERVICE_ACCOUNTS = "system:serviceaccounts"

_BEARER = re.compile(r"Bearer ([\x21-\x7e]+)")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclasses.dataclass(frozen=True)
class UserInfo:
    """An authenticated identity, as Kubernetes' ``user.Info`` (name and groups)."""

    name: str
    groups: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        """Members of ``system:masters`` pass every authorization check."""
        return MASTERS in self.groups


ADMIN = UserInfo("system:admin", (MASTERS, AUTHENTICATED))
USER: web.RequestKey[UserInfo] = web.RequestKey("user", UserInfo)


def user(name: str, groups: tuple[str, ...] | list[str] = ()) -> UserInfo:
    """A user's identity: their groups, then ``system:authenticated``."""
    extra = tuple(g for g in dict.fromkeys(groups) if g != AUTHENTICATED)
    return UserInfo(name, (*extra, AUTHENTICATED))


def service_account(namespace: str, name: str) -> UserInfo:
    """A service account's identity, exactly as Kubernetes (and CDI's clone check) forms it."""
    return UserInfo(f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}",
                    (SERVICE_ACCOUNTS, f"{SERVICE_ACCOUNTS}:{namespace}", AUTHENTICATED))


def user_of(request: web.Request) -> UserInfo:
    """Who sent REQUEST (set by the middleware); the admin for apps built without one."""
    found = request.get(USER)
    return found if found is not None else ADMIN


def bearer_token(header: str | None) -> str | None:
    """The token in an ``Authorization`` header value, or None if it has none."""
    if header is None:
        return None
    match = _BEARER.fullmatch(header)
    return match.group(1) if match else None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- The registry of tokens ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Token:
    """One registered token, without the token itself."""

    id: str
    sha256: str = dataclasses.field(repr=False)
    kind: str  # "User" or "ServiceAccount"
    name: str
    namespace: str = ""  # of a service account
    groups: tuple[str, ...] = ()  # a user's own groups, as given
    created: str = ""

    @property
    def identity(self) -> UserInfo:
        if self.kind == "ServiceAccount":
            return service_account(self.namespace, self.name)
        return user(self.name, self.groups)

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the digest."""
        info = self.identity
        shown: dict[str, Any] = {"id": self.id, "kind": self.kind, "user": info.name,
                                 "groups": list(info.groups), "created": self.created}
        if self.kind == "ServiceAccount":
            shown["serviceAccount"] = {"namespace": self.namespace, "name": self.name}
        return shown

    def record(self) -> dict[str, Any]:
        """What the file keeps."""
        return {"id": self.id, "sha256": self.sha256, "kind": self.kind, "name": self.name,
                "namespace": self.namespace, "groups": list(self.groups),
                "created": self.created}


class TokenRegistry:
    """The non-admin tokens, as SHA-256 digests in PATH (0600, replaced atomically).

    The server is the file's only writer; it reads it once at start and keeps
    it in memory.  Writes run in the default executor, one at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens: dict[str, Token] = {}
        self._lock = asyncio.Lock()
        if path.exists():
            data = json.loads(path.read_text())
            for r in data.get("tokens", []):
                t = Token(id=r["id"], sha256=r["sha256"], kind=r["kind"], name=r["name"],
                          namespace=r.get("namespace", ""), groups=tuple(r.get("groups", ())),
                          created=r.get("created", ""))
                self._tokens[t.id] = t

    def tokens(self) -> list[Token]:
        """The tokens, oldest first."""
        return list(self._tokens.values())

    def authenticate(self, token: str) -> UserInfo | None:
        """The identity TOKEN stands for, or None; compares against every digest."""
        given = digest(token).encode()
        found: Token | None = None
        for t in list(self._tokens.values()):
            if hmac.compare_digest(t.sha256.encode(), given):
                found = t
        return found.identity if found is not None else None

    async def create(self, *, kind: str, name: str, namespace: str = "",
                     groups: tuple[str, ...] = ()) -> tuple[Token, str]:
        """Register a new token; returns it with the secret (shown this once)."""
        secret = secrets.token_urlsafe(32)
        async with self._lock:
            token_id = secrets.token_hex(4)
            while token_id in self._tokens:
                token_id = secrets.token_hex(4)
            created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            t = Token(id=token_id, sha256=digest(secret), kind=kind, name=name,
                      namespace=namespace, groups=groups, created=created)
            await self._save({**self._tokens, t.id: t})
        log.info("TOKEN created id=%s user=%s", t.id, t.identity.name)
        return t, secret

    async def revoke(self, token_id: str) -> Token:
        async with self._lock:
            t = self._tokens.get(token_id)
            if t is None:
                raise errors.NotFound(f'token "{token_id}" not found', kind="tokens",
                                      name=token_id)
            await self._save({k: v for k, v in self._tokens.items() if k != token_id})
        log.info("TOKEN revoked id=%s user=%s", t.id, t.identity.name)
        return t

    async def _save(self, tokens: dict[str, Token]) -> None:
        text = json.dumps({"tokens": [t.record() for t in tokens.values()]}, indent=2) + "\n"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _write_private, self.path, text)
        self._tokens = tokens


def _write_private(path: Path, text: str) -> None:
    """Write TEXT to PATH, mode 0600, atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- The middleware and the token endpoint ---------------------------------------------------


def middleware(token: str, registry: TokenRegistry | None = None) -> Middleware:
    """A middleware that lets through only requests bearing TOKEN (the admin's) or
    a token in REGISTRY, and records who sent them (:func:`user_of`)."""
    if not token:
        raise ValueError("the API token must not be empty")
    expected = token.encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in UNAUTHENTICATED:
            request[USER] = UserInfo("system:anonymous", (UNAUTHENTICATED_GROUP,))
            return await handler(request)
        given = bearer_token(request.headers.get("Authorization"))
        if given is None:
            raise errors.Unauthorized("Unauthorized")
        identity: UserInfo | None = None
        if hmac.compare_digest(given.encode(), expected):
            identity = ADMIN
        elif registry is not None:
            identity = registry.authenticate(given)
        if identity is None:
            raise errors.Unauthorized("Unauthorized")
        request[USER] = identity
        return await handler(request)

    return authenticate


REGISTRY = web.AppKey("token_registry", TokenRegistry)


def add_routes(app: web.Application, registry: TokenRegistry) -> None:
    """``/auth/v1/tokens``: list (GET), create (POST) and revoke (DELETE .../{id}).

    Only ``system:masters`` reaches these (the RBAC middleware refuses anyone
    else); the handlers check again, so a mistake in one place is not enough.
    """
    app[REGISTRY] = registry
    app.router.add_get(TOKENS_PATH, _list_tokens)
    app.router.add_post(TOKENS_PATH, _create_token)
    app.router.add_delete(TOKENS_PATH + "/{id}", _revoke_token)



def _admin_only(request: web.Request) -> TokenRegistry:
    who = user_of(request)
    if not who.is_admin:
        raise errors.Forbidden(f"forbidden: User {json.dumps(who.name)} cannot "
                               f"{request.method.lower()} path {json.dumps(request.path)}")
    return request.app[REGISTRY]


async def _list_tokens(request: web.Request) -> web.StreamResponse:
    registry = _admin_only(request)
    return web.json_response({"kind": "TokenList", "apiVersion": "auth.cdi.kubevirt.io/v1",
                              "items": [t.public() for t in registry.tokens()]})


async def _create_token(request: web.Request) -> web.StreamResponse:
    registry = _admin_only(request)
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError as e:
        raise errors.BadRequest(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise errors.BadRequest("the request body must be a JSON object")
    kind, name, namespace, groups = _token_request(body)
    t, secret = await registry.create(kind=kind, name=name, namespace=namespace, groups=groups)
    return web.json_response({**t.public(), "token": secret}, status=201)


async def _revoke_token(request: web.Request) -> web.StreamResponse:
    registry = _admin_only(request)
    t = await registry.revoke(request.match_info["id"])
    return web.json_response(t.public())


def _token_request(body: dict[str, Any]) -> tuple[str, str, str, tuple[str, ...]]:
    """(kind, name, namespace, groups) from ``{"user": ..., "groups": [...]}`` or
    ``{"serviceAccount": {"namespace": ..., "name": ...}}``; 400 if neither or both."""
    sa, name = body.get("serviceAccount"), body.get("user")
    if (sa is None) == (name is None):
        raise errors.BadRequest('give either "user" or "serviceAccount"')
    if sa is not None:
        if not isinstance(sa, dict) or body.get("groups"):
            raise errors.BadRequest('"serviceAccount" is {"namespace": ..., "name": ...} '
                                    "and takes no groups")
        ns, sa_name = sa.get("namespace"), sa.get("name")
        if not isinstance(ns, str) or len(ns) > 63 or not _DNS_LABEL.fullmatch(ns):
            raise errors.BadRequest(f"invalid service account namespace {ns!r}: "
                                    "must be a DNS-1123 label")
        if not isinstance(sa_name, str) or len(sa_name) > 253 or \
                not _DNS_SUBDOMAIN.fullmatch(sa_name):
            raise errors.BadRequest(f"invalid service account name {sa_name!r}: "
                                    "must be a DNS-1123 subdomain")
        return "ServiceAccount", sa_name, ns, ()
    groups = body.get("groups") or []
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise errors.BadRequest("invalid user name: must be a non-empty string without "
                                "surrounding spaces")
    if name.startswith(SERVICE_ACCOUNT_PREFIX):
        raise errors.BadRequest(f'user names starting with "{SERVICE_ACCOUNT_PREFIX}" are '
                                "service accounts: ask for a serviceAccount token")
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise errors.BadRequest('"groups" must be a list of non-empty strings')
    return "User", name, "", tuple(dict.fromkeys(groups))

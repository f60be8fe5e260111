"""Where the Kubernetes API is and how to prove who we are: in-cluster and kubeconfig.

``cdi.backends.kube`` talks to the API server; this module only finds it.  A
controller Pod uses its service account (``/var/run/secrets/kubernetes.io/
serviceaccount``: a token the kubelet rotates, so it is re-read every minute,
and the cluster CA); a developer's machine uses a kubeconfig (``--kubeconfig``,
``$KUBECONFIG`` or ``~/.kube/config``) with one of the ways kubectl knows of
proving an identity: a bearer token or token file, a client certificate (file
or inline data), or an exec credential plugin (``client.authentication.k8s.io``
``ExecCredential``, run as an argv list, its token cached until it expires).
OIDC/GCP auth-provider entries are not read (they are deprecated in kubectl).

Tokens never appear in ``repr`` or logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD = 60.0
"""Seconds a token file is trusted before it is read again (bound tokens rotate)."""
EXEC_TIMEOUT = 60.0


class ConfigError(Exception):
    """No usable configuration: the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class ExecPlugin:
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"


@dataclasses.dataclass
class Config:
    """One cluster and one identity.  ``token`` is a static bearer token."""

    server: str
    ca_pem: str | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    token_file: Path | None = None
    client_cert_pem: bytes | None = dataclasses.field(default=None, repr=False)
    client_key_pem: bytes | None = dataclasses.field(default=None, repr=False)
    exec_plugin: ExecPlugin | None = None
    namespace: str = "default"
    _cached: tuple[str, float] | None = dataclasses.field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_pem and self.client_key_pem:
            _load_chain(ctx, self.client_cert_pem, self.client_key_pem)
        return ctx

    async def authorization(self) -> str | None:
        """The ``Authorization`` header value, or None (client certificates only)."""
        if self.token:
            return f"Bearer {self.token}"
        if self._cached is not None and time.monotonic() < self._cached[1]:
            return f"Bearer {self._cached[0]}"
        if self.token_file is not None:
            token = self.token_file.read_text().strip()
            self._cached = (token, time.monotonic() + TOKEN_REREAD)
            return f"Bearer {token}"
        if self.exec_plugin is not None:
            token, lifetime = await _run_exec(self.exec_plugin, self.server)
            self._cached = (token, time.monotonic() + lifetime)
            return f"Bearer {token}"
        return None

    def invalidate(self) -> None:
        """Forget a cached token (the server said 401): the next call fetches anew."""
        self._cached = None


def load(kubeconfig: Path | None = None, context: str | None = None, *,
         service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> Config:
    """The configuration kubectl would use: an explicit kubeconfig, ``$KUBECONFIG``,
    the service account when running in a Pod, else ``~/.kube/config``."""
    if kubeconfig is not None:
        return from_kubeconfig(kubeconfig, context)
    env = os.environ.get("KUBECONFIG")
    if env:
        return from_kubeconfig(Path(env.split(os.pathsep)[0]), context)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(service_account_dir)
    default = Path.home() / ".kube" / "config"
    if default.exists():
        return from_kubeconfig(default, context)
    raise ConfigError("no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not "
                      "running in a Pod ($KUBERNETES_SERVICE_HOST is unset)")


def in_cluster(service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> Config:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError("KUBERNETES_SERVICE_HOST is not set: not running in a Pod")
    token_file = service_account_dir / "token"
    ca_file = service_account_dir / "ca.crt"
    for path in (token_file, ca_file):
        if not path.is_file():
            raise ConfigError(f"{path} is missing: is a service account token mounted?")
    ns_file = service_account_dir / "namespace"
    namespace = ns_file.read_text().strip() if ns_file.is_file() else "default"
    server_host = f"[{host}]" if ":" in host else host
    return Config(server=f"https://{server_host}:{port}", ca_pem=ca_file.read_text(),
                  token_file=token_file, namespace=namespace)


def from_kubeconfig(path: Path, context: str | None = None) -> Config:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read kubeconfig: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a kubeconfig")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"{path}: no current-context, and no context given")
    ctx = _named(doc, "contexts", "context", name, path)
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), path)
    user = _named(doc, "users", "user", ctx.get("user"), path) if ctx.get("user") else {}
    if not cluster.get("server"):
        raise ConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
    base = path.parent
    config = Config(server=str(cluster["server"]).rstrip("/"),
                    ca_pem=_pem(cluster, "certificate-authority", base, text=True),
                    insecure=bool(cluster.get("insecure-skip-tls-verify")),
                    tls_server_name=cluster.get("tls-server-name"),
                    namespace=str(ctx.get("namespace") or "default"))
    config.token = user.get("token")
    if user.get("tokenFile"):
        config.token_file = base / str(user["tokenFile"])
    cert = _pem(user, "client-certificate", base)
    key = _pem(user, "client-key", base)
    if cert is not None and key is not None:
        config.client_cert_pem, config.client_key_pem = cert, key
    exe = user.get("exec")
    if isinstance(exe, dict) and exe.get("command"):
        config.exec_plugin = ExecPlugin(
            command=str(exe["command"]), args=tuple(str(a) for a in exe.get("args") or ()),
            env=tuple((str(e["name"]), str(e["value"])) for e in exe.get("env") or ()),
            api_version=str(exe.get("apiVersion") or ExecPlugin.api_version))
    return config


def _named(doc: dict[str, Any], section: str, field: str, name: Any, path: Path
           ) -> dict[str, Any]:
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(field) or {}
            if isinstance(value, dict):
                return value
    raise ConfigError(f"{path}: no {field} named {name!r}")


def _pem(section: dict[str, Any], field: str, base: Path, *, text: bool = False) -> Any:
    data = section.get(f"{field}-data")
    raw: bytes | None = None
    if data:
        raw = base64.b64decode(str(data))
    elif section.get(field):
        raw = (base / str(section[field])).read_bytes()
    if raw is None:
        return None
    return raw.decode() if text else raw


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """``load_cert_chain`` reads files only: a private temporary directory, removed at once."""
    with tempfile.TemporaryDirectory(prefix="cdi-kube-") as tmp:
        cert_file, key_file = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert_file.write_bytes(cert)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        ctx.load_cert_chain(str(cert_file), str(key_file))


async def _run_exec(plugin: ExecPlugin, server: str) -> tuple[str, float]:
    """Run a credential plugin; (token, seconds it may be cached)."""
    request = {"apiVersion": plugin.api_version, "kind": "ExecCredential",
               "spec": {"interactive": False, "cluster": {"server": server}}}
    env = dict(os.environ, **dict(plugin.env),
               KUBERNETES_EXEC_INFO=json.dumps(request))
    try:
        proc = await asyncio.create_subprocess_exec(
            plugin.command, *plugin.args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise ConfigError(f"credential plugin {plugin.command}: {e}") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXEC_TIMEOUT)
    except TimeoutError as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ConfigError(f"credential plugin {plugin.command}: no answer in "
                          f"{EXEC_TIMEOUT:.0f}s") from e
    if proc.returncode != 0:
        raise ConfigError(f"credential plugin {plugin.command} exited {proc.returncode}: "
                          f"{err.decode(errors='replace')[:256]}")
    try:
        status = json.loads(out)["status"]
        token = str(status["token"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"credential plugin {plugin.command}: no status.token in its "
                          "ExecCredential") from e
    lifetime = TOKEN_REREAD * 10
    expiry = status.get("expirationTimestamp")
    if expiry:
        try:
            when = datetime.datetime.fromisoformat(str(expiry).replace("Z", "+00:00"))
            lifetime = (when - datetime.datetime.now(datetime.UTC)).total_seconds() - 10
        except ValueError:
            pass
    return token, max(lifetime, 0.0)

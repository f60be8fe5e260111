"""A real container registry for tests: Debian's docker-registry (distribution 2.8).

:class:`Registry` runs ``/usr/bin/docker-registry serve`` on 127.0.0.1 with a
config written here (JSON, which YAML reads): filesystem storage in a temp dir,
plain HTTP or TLS with the test CA, and optionally htpasswd (basic) or token
auth.  :class:`TokenServer` is the token service the registry sends clients
to: it checks basic credentials and issues the JWTs distribution 2.8 accepts,
which is to say ES256 (or RS256) JWS tokens whose ``x5c`` header carries a
certificate that chains to a certificate in the registry's ``rootcertbundle``
(a ``kid`` would have to be a libtrust fingerprint of a key in that bundle;
``x5c`` is simpler), with ``iss`` = the configured issuer, ``aud`` = the
service (a string), ``nbf``/``exp`` within 60 s of leeway, and an ``access``
list granting the requested repository actions.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import dataclasses
import datetime
import importlib
import json
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support.tls import TLSFiles

BINARY = "/usr/bin/docker-registry"
HOST = "127.0.0.1"
SERVICE = "test-registry"
ISSUER = "test-token-issuer"
START_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1
_ACCESS = re.compile(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) ')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even if it is killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- htpasswd --------------------------------------------------------------------------


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash (the only kind distribution's htpasswd accepts).

    The ``bcrypt`` module and apache2-utils' ``htpasswd`` are not installed here;
    libxcrypt (Debian's libcrypt1, an essential package) implements ``$2b$`` and is
    used when neither is available.
    """
    try:
        bcrypt: Any = importlib.import_module("bcrypt")
        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())
    except ImportError:
        pass
    htpasswd = shutil.which("htpasswd")
    if htpasswd is not None:
        out = subprocess.run([htpasswd, "-nbB", "-C", "4", "user", password],
                             capture_output=True, check=True, text=True).stdout
        return out.strip().partition(":")[2]
    lib = ctypes.util.find_library("crypt")
    if lib is None:
        raise RuntimeError("no bcrypt implementation: install python3-bcrypt or apache2-utils")
    libcrypt = ctypes.CDLL(lib)
    libcrypt.crypt.restype = ctypes.c_char_p
    libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    # 22 salt characters; the last one only carries 2 bits, so pick from those it allows.
    salt = "".join(secrets.choice(alphabet) for _ in range(21)) + secrets.choice(".Oeu")
    result = libcrypt.crypt(password.encode(), f"$2b$04${salt}".encode())
    if not result or not result.startswith(b"$2b$"):
        raise RuntimeError("libcrypt has no bcrypt support")
    return str(result.decode())


# -- token auth ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    account: str | None  # from the Basic credentials, None when anonymous
    scopes: list[str]
    status: int


class TokenServer:
    """``GET /token?service=&scope=`` -> ``{"token": <JWT>}``, for the users it knows.

    ``users`` maps a name to (password, allowed actions); anonymous clients get
    ``anonymous_actions``.  ``field`` is the JSON key of the token (Docker Hub's
    auth answers with both ``token`` and ``access_token``).
    """

    def __init__(self, users: dict[str, tuple[str, str]], *, anonymous_actions: str = "",
                 field: str = "token") -> None:
        self.users = users
        self.anonymous_actions = anonymous_actions
        self.field = field
        self.requests: list[TokenRequest] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-server",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}/token"

    def write_bundle(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, account: str, access: list[dict[str, Any]], *, lifetime: int = 300) -> str:
        now = int(time.time())
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": ISSUER, "sub": account, "aud": SERVICE, "exp": now + lifetime,
                  "nbf": now - 1, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(),
                                                   ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def _grant(self, account: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        allowed = set((self.users[account][1] if account else self.anonymous_actions).split(","))
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a in allowed]
            if kind == "repository" and granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scopes = query.get("scope", [])
                account: str | None = None
                header = self.headers.get("Authorization", "")
                status = 200
                if header.lower().startswith("basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    account = user
                    if server.users.get(user, ("", ""))[0] != password or not password:
                        status = 401
                server.requests.append(TokenRequest(account, scopes, status))
                if status == 401:
                    body = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                                   "message": "invalid credentials"}]})
                else:
                    token = server.issue(account or "", server._grant(account, scopes))
                    body = json.dumps({server.field: token, "expires_in": 300})
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# -- the registry ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Access:
    method: str
    path: str
    status: int


class Registry:
    """docker-registry in ROOT (config, storage, log); ``stop()`` ends it."""

    def __init__(self, root: Path, *, tls: TLSFiles | None = None,
                 htpasswd: dict[str, str] | None = None,
                 token: TokenServer | None = None) -> None:
        self.root = root
        self.tls = tls
        self.storage = root / "storage"
        self.log = root / "registry.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._auth: dict[str, Any] = {}
        root.mkdir(parents=True, exist_ok=True)
        if htpasswd is not None:
            path = root / "htpasswd"
            path.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in htpasswd.items()))
            self._auth = {"htpasswd": {"realm": "test-registry", "path": str(path)}}
        elif token is not None:
            bundle = token.write_bundle(root / "token-signers.pem")
            self._auth = {"token": {"realm": token.url, "service": SERVICE, "issuer": ISSUER,
                                    "rootcertbundle": str(bundle)}}

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"{self.host}/{repository}:{tag}"

    def _config(self) -> dict[str, Any]:
        http: dict[str, Any] = {"addr": self.host, "secret": secrets.token_hex(16)}
        if self.tls is not None:
            http["tls"] = {"certificate": str(self.tls.server_cert),
                           "key": str(self.tls.server_key)}
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}, "redirect": {"disable": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": http,
        }
        if self._auth:
            config["auth"] = self._auth
        return config

    def start(self) -> Registry:
        for _ in range(3):  # another process may take the free port before we bind it
            self.port = _free_port()
            config = self.root / "config.yml"
            config.write_text(json.dumps(self._config(), indent=1))
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log,
                                              stderr=subprocess.STDOUT,
                                              preexec_fn=_die_with_parent)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.log}:\n"
                           + self.log.read_text(errors="replace")[-2000:])

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    if self.tls is not None:
                        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
                        with ctx.wrap_socket(sock, server_hostname=HOST):
                            pass
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (tests tamper with it)."""
        algorithm, _, hexdigest = digest.partition(":")
        return (self.storage / "docker/registry/v2/blobs" / algorithm / hexdigest[:2]
                / hexdigest / "data")

    def accesses(self) -> list[Access]:
        """Requests the registry answered, from its access log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [Access(m, p, int(s)) for m, p, s in _ACCESS.findall(text)]

"""A real S3 endpoint for the S3 source's tests: moto in server mode on 127.0.0.1.

The importer talks to it with real boto3 over real sockets, plain HTTP or TLS
with a certificate from a trustme CA (``tests/support/tls.py``).  moto's
werkzeug application is served from a thread of the test process, so every
server started here shares one in-memory S3 (and IAM): a bucket created
through one endpoint is visible through the other.

moto accepts any request by default.  ``require_auth`` turns on its IAM
simulation (signatures checked against the access keys of IAM users made with
``create_user``), which is how a wrong secret key gets a real
``SignatureDoesNotMatch``; unsigned requests then fail, so anonymous access is
tested with authentication off.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

import boto3
import botocore.config
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from tests.support.tls import TLSFiles, server_ssl_context

REGION = "us-east-1"
SETUP_KEY_ID = "testing"  # what setup requests are signed with (auth is off then)
SETUP_SECRET = "testing"
READ_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"}],
}

# werkzeug logs every request at INFO on its own stderr handler.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


class MotoS3:
    """moto's S3 (and IAM) served on 127.0.0.1 from a thread; HTTPS when TLS files are given."""

    def __init__(self, tls: TLSFiles | None = None) -> None:
        self.tls = tls
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[str, Any] = {}  # a client costs ~0.3 s (its JSON model)
        self._buckets: set[str] = set()

    def start(self) -> MotoS3:
        context = server_ssl_context(self.tls) if self.tls is not None else None
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"moto-{self.scheme}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, bucket: str, key: str) -> str:
        """The path-style URL the importer is given (IMPORTER_ENDPOINT)."""
        return f"{self.endpoint}/{bucket}/{urllib.parse.quote(key)}"

    # -- setup, through boto3 ------------------------------------------------------

    def client(self, service: Literal["s3", "iam"] = "s3") -> Any:
        """A boto3 client for setting up buckets, objects and users (auth must be off)."""
        if service not in self._clients:
            self._clients[service] = self._make_client(service)
        return self._clients[service]

    def _make_client(self, service: Literal["s3", "iam"]) -> Any:
        verify: str | bool = str(self.tls.ca_cert) if self.tls is not None else False
        kwargs: dict[str, Any] = {
            "region_name": REGION, "endpoint_url": self.endpoint, "verify": verify,
            "aws_access_key_id": SETUP_KEY_ID, "aws_secret_access_key": SETUP_SECRET,
            "config": botocore.config.Config(s3={"addressing_style": "path"}),
        }
        session = boto3.session.Session()
        if service == "iam":
            return session.client("iam", **kwargs)
        return session.client("s3", **kwargs)

    def put(self, bucket: str, key: str, data: Path | bytes, *, public: bool = False) -> str:
        """Store DATA as BUCKET/KEY (creating the bucket); returns the object's ETag.

        A PUBLIC object (ACL public-read) can be read without credentials.
        """
        s3 = self.client()
        if bucket not in self._buckets:
            s3.create_bucket(Bucket=bucket)
            self._buckets.add(bucket)
        body = data.read_bytes() if isinstance(data, Path) else data
        extra = {"ACL": "public-read"} if public else {}
        etag: str = s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)["ETag"]
        return etag

    def create_user(self, name: str) -> tuple[str, str]:
        """An IAM user allowed s3:GetObject; returns its (access key ID, secret key)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="read",
                            PolicyDocument=json.dumps(READ_POLICY))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    # -- moto's control API --------------------------------------------------------

    def require_auth(self, enabled: bool) -> None:
        """Check signatures and IAM permissions of every request from now on (or stop)."""
        self._control("/moto-api/reset-auth", b"0" if enabled else b"inf")

    def reset(self) -> None:
        """Forget every bucket, object and user (moto closes the objects' buffers)."""
        self._control("/moto-api/reset", b"")
        self._buckets.clear()

    def _control(self, path: str, body: bytes) -> None:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        # text/plain: with urllib's default (a form) moto would not see the body.
        request = urllib.request.Request(  # noqa: S310 - our own http(s) URL
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10, context=context) as r:  # noqa: S310
            r.read()

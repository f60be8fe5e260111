"""Property-based fuzzing of the parsers that read what a stranger sends.

Each target takes arbitrary input from hypothesis and must either return a
value of its declared kind or raise the error its callers translate into a
clear message; anything else (an IndexError, a UnicodeDecodeError, a hang)
is a crash.  The runs are bounded (``EXAMPLES`` per target, no deadline on
this shared machine) and derandomized, so CI explores the same inputs every
time; inputs that once crashed a parser are pinned with ``@example`` so they
stay regression cases.

Targets: the image format detector (first bytes of a download or upload),
the upload proxy's ``Authorization`` parsing and the token verifier, the
upload server's chunked and multipart body readers, the registry's manifest
and reference parsers, CDI quantities, and the YAML loader of ``cdi apply``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdi.api import tokens
from cdi.cli import manifests
from importer import errors, formats, oci, units
from importer.upload import body
from uploadproxy import auth
from uploadproxy import errors as proxy_errors

EXAMPLES = 1000
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

KINDS = {"raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx", "gz", "xz", "zst", "bz2"}
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _magic_prefixed() -> st.SearchStrategy[bytes]:
    """Bytes that start like a known format, so the detector's deeper checks run."""
    magics = [b"QFI\xfb", b"KDMV", b"conectix", b"vhdxfile", b"\x1f\x8b", b"\xfd7zXZ\x00",
              b"(\xb5/\xfd", b"BZh9", b"<<< Oracle VM VirtualBox Disk Image >>>\n"]
    return st.tuples(st.sampled_from(magics), st.binary(max_size=2048)).map(
        lambda t: t[0] + t[1])


@fuzz
@given(st.one_of(st.binary(max_size=70_000), _magic_prefixed()))
@example(b"")
@example(b"\x01CD001")
def test_format_detector(data: bytes) -> None:
    """The first bytes name a known layer; unwrapping and reading to the end either
    works or fails with a corrupt-stream error, whatever the bytes."""
    assert formats.kind_of(data) in KINDS
    try:
        detected = formats.detect(io.BytesIO(data))
        assert set(detected.layers) <= KINDS
        buf = memoryview(bytearray(65536))
        while detected.reader.readinto(buf):
            pass
    except errors.Error:
        return


@fuzz
@given(st.one_of(st.none(), st.text(max_size=300),
                 st.text(max_size=300).map(lambda t: "Bearer " + t)))
def test_authorization_header(value: str | None) -> None:
    headers = {} if value is None else {"Authorization": value}
    try:
        token = auth.bearer_token(headers)
    except (proxy_errors.MissingAuthorization, proxy_errors.MalformedAuthorization):
        return
    assert token and " " not in token


@fuzz
@given(st.one_of(
    st.text(max_size=400),
    st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=",
                     max_size=200), min_size=3, max_size=3).map(".".join),
))
@example("e30.e30.")
@example("...")
def test_token_verifier(token: str) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.verify(_KEY.public_key(), token)


@fuzz
@given(st.binary(max_size=4096))
@example(b"0\r\n\r\n")
@example(b"-1\r\n")
@example(b"1\r\nab\r\n0\r\n\r\n")
def test_chunked_body(data: bytes) -> None:
    reader = body.ChunkedBody(io.BufferedReader(io.BytesIO(data)))
    buf = memoryview(bytearray(512))
    total = 0
    try:
        while n := reader.readinto(buf):
            total += n
    except (body.MalformedBody, body.ClientDisconnected):
        return
    assert total <= len(data)


@fuzz
@given(st.text(max_size=200))
@example("multipart/form-data; boundary=")
@example('multipart/form-data; boundary="')
def test_form_boundary(content_type: str) -> None:
    try:
        boundary = body.form_boundary(content_type)
    except body.MalformedBody:
        return
    assert boundary


@fuzz
@given(st.binary(max_size=4096))
@example(b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nxx\r\n--b--\r\n")
@example(b"--b\r\n\r\n")
def test_multipart_body(data: bytes) -> None:
    src = io.BufferedReader(io.BytesIO(data))
    form = body.FormFile(body.LengthBody(src, len(data)), b"b")
    buf = memoryview(bytearray(256))
    try:
        while form.readinto(buf):
            pass
    except (body.MalformedBody, body.ClientDisconnected):
        return


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20)


@fuzz
@given(st.one_of(st.binary(max_size=2000),
                 st.dictionaries(st.sampled_from(["schemaVersion", "mediaType", "config",
                                                  "layers", "manifests", "digest", "size"]),
                                 _json_values, max_size=6).map(
                     lambda d: json.dumps(d).encode())),
       st.sampled_from(["", oci.OCI_MANIFEST, oci.OCI_INDEX, "text/plain"]))
def test_manifest_parser(content: bytes, content_type: str) -> None:
    try:
        oci.parse_document(content, content_type)
    except errors.Error:
        return


@fuzz
@given(st.text(max_size=300))
@example("docker://")
@example("docker://a@sha256:")
def test_image_reference(text: str) -> None:
    try:
        oci.parse_reference(text)
    except errors.Error:
        return


@fuzz
@given(st.text(max_size=40))
@example("1e308")
@example("9" * 400 + "Ei")
def test_quantity(text: str) -> None:
    try:
        value = units.parse_quantity(text)
    except (ValueError, errors.Error):
        return
    assert isinstance(value, int)


@fuzz
@given(st.text(max_size=600))
@example("a: &a [*a, *a]\n")
@example("--- !!python/object/apply:os.system ['true']\n")
@example("kind: DataVolume\napiVersion: cdi.kubevirt.io/v1beta1\nmetadata: 7\n")
def test_manifest_loader(tmp_path: Path, text: str) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        manifests.load([str(path)], namespace="default", explicit_namespace=False)
    except manifests.ManifestError:
        return

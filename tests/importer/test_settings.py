"""The environment contract: every variable read once, bad values named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from importer import errors, settings


def test_defaults_and_values(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    s = settings.from_env({
        "IMPORTER_SOURCE": "http",
        "IMPORTER_ENDPOINT": "https://example.com/disk.qcow2",
        "IMPORTER_CONTENTTYPE": "something-else",
        "IMPORTER_IMAGE_SIZE": "10Gi",
        "FILESYSTEM_OVERHEAD": "0.055",
        "PREALLOCATION": "true",
        "INSECURE_TLS": "false",
        "IMPORTER_CHECKSUM": "SHA256:" + "A" * 64,
        "IMPORTER_ACCESS_KEY_ID": "user",
        "IMPORTER_SECRET_KEY": "pass",
        "IMPORTER_EXTRA_HEADER_1": "X-Second: 2",
        "IMPORTER_EXTRA_HEADER_0": "X-First: a:b",
        "IMPORTER_CERT_DIR": str(certs),
        "http_proxy": "http://proxy:3128",
        "NO_PROXY": "localhost",
        "OWNER_UID": "uid-1",
        "IMPORTER_DATA_DIR": "/vol",
    })
    assert s.content_type == "kubevirt", "CDI treats unknown content types as kubevirt"
    assert s.image_size == 10 << 30
    assert s.filesystem_overhead == 0.055
    assert s.preallocation is True and s.insecure_tls is False
    assert s.checksum == settings.Checksum("sha256", "a" * 64)
    assert s.basic_auth == ("user", "pass")
    assert s.extra_headers == (("X-First", "a:b"), ("X-Second", "2"))
    assert s.cert_dir == certs
    assert (s.http_proxy, s.https_proxy, s.no_proxy) == ("http://proxy:3128", None, "localhost")
    assert s.target_file == Path("/vol/disk.img")
    assert s.block_path == Path("/dev/cdi-block-volume")
    assert s.scratch_dir == Path("/scratch")


def test_pull_method() -> None:
    """CDI's IMPORTER_PULL_METHOD: pod (the default) pulls from the registry; node reads the
    image volume the pod mounts at /containerdisk (IMPORTER_IMAGE_DIR elsewhere)."""
    registry = {"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": "docker://r.example/os:1"}
    s = settings.from_env(registry)
    assert (s.pull_method, s.image_dir) == ("pod", Path("/containerdisk"))
    s = settings.from_env({**registry, "IMPORTER_PULL_METHOD": "Node",
                           "IMPORTER_IMAGE_DIR": "/mnt/image"})
    assert (s.pull_method, s.image_dir) == ("node", Path("/mnt/image"))
    assert settings.from_env({**registry, "IMPORTER_PULL_METHOD": ""}).pull_method == "pod"


def test_blank_needs_no_endpoint() -> None:
    s = settings.from_env({"IMPORTER_SOURCE": "none"})
    assert s.source == "none" and s.endpoint == ""


def test_basic_auth_needs_both() -> None:
    s = settings.from_env({"IMPORTER_ENDPOINT": "http://h/x", "IMPORTER_ACCESS_KEY_ID": "u"})
    assert s.basic_auth is None


def test_secret_extra_headers(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "token").write_text("Authorization: Bearer abc\n")
    (tmp_path / "0" / ".hidden").write_text("ignored")
    s = settings.from_env({"IMPORTER_ENDPOINT": "http://h/x",
                           "IMPORTER_SECRET_EXTRA_HEADERS_DIR": str(tmp_path)})
    assert s.extra_headers == (("Authorization", "Bearer abc"),)


@pytest.mark.parametrize("env,variable,reason", [
    ({"IMPORTER_SOURCE": "ftp"}, "IMPORTER_SOURCE", "Unknown data source: ftp"),
    ({}, "IMPORTER_ENDPOINT", "an http import needs the URL of the image"),
    ({"IMPORTER_ENDPOINT": "file:///etc/passwd"}, "IMPORTER_ENDPOINT",
     "the URL must start with http:// or https://"),
    ({"IMPORTER_SOURCE": "registry"}, "IMPORTER_ENDPOINT",
     "a registry import needs the URL of the image"),
    ({"IMPORTER_SOURCE": "s3", "IMPORTER_ENDPOINT": "s3://bucket/key"}, "IMPORTER_ENDPOINT",
     "the URL must start with http:// or https://"),
    ({"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": "http://h/x"}, "IMPORTER_ENDPOINT",
     "a registry image is docker://host[:port]/repo[:tag|@digest] or oci-archive:<path>"),
    ({"IMPORTER_REGISTRY_IMAGE_ARCHITECTURE": "", "IMPORTER_INSECURE_REGISTRY": "perhaps",
      "IMPORTER_ENDPOINT": "http://h/x"}, "IMPORTER_INSECURE_REGISTRY",
     "'perhaps' is not a boolean (true/false)"),
    ({"PREALLOCATION": "maybe"}, "PREALLOCATION", "'maybe' is not a boolean (true/false)"),
    ({"INSECURE_TLS": "yes please"}, "INSECURE_TLS", "'yes please' is not a boolean (true/false)"),
    ({"IMPORTER_IMAGE_SIZE": "ten gigs"}, "IMPORTER_IMAGE_SIZE",
     "'ten gigs' is not a quantity (examples: 10Gi, 500M, 1073741824)"),
    ({"IMPORTER_IMAGE_SIZE": "0"}, "IMPORTER_IMAGE_SIZE", "the size must be positive"),
    ({"FILESYSTEM_OVERHEAD": "1.5"}, "FILESYSTEM_OVERHEAD",
     "'1.5' is not a fraction between 0 and 1 with at most 3 decimals"),
    ({"FILESYSTEM_OVERHEAD": "-0.1"}, "FILESYSTEM_OVERHEAD",
     "'-0.1' is not a fraction between 0 and 1 with at most 3 decimals"),
    ({"IMPORTER_CHECKSUM": "crc32:abcd"}, "IMPORTER_CHECKSUM",
     "'crc32:abcd' must be <md5|sha1|sha256|sha512>:<hex digest>"),
    ({"IMPORTER_CHECKSUM": "md5:abc"}, "IMPORTER_CHECKSUM",
     "a md5 digest is 32 hexadecimal characters"),
    ({"IMPORTER_EXTRA_HEADER_0": "no colon"}, "IMPORTER_EXTRA_HEADER_0",
     "a header is 'Name: value' on one line"),
    ({"IMPORTER_CERT_DIR": "/nonexistent/certs"}, "IMPORTER_CERT_DIR",
     "/nonexistent/certs is not a directory"),
    ({"IMPORTER_STALL_TIMEOUT": "soon"}, "IMPORTER_STALL_TIMEOUT",
     "'soon' is not a non-negative number"),
    ({"IMPORTER_PULL_METHOD": "kubelet"}, "IMPORTER_PULL_METHOD",
     "'kubelet' is neither pod nor node"),
    ({"IMPORTER_PULL_METHOD": "node"}, "IMPORTER_PULL_METHOD",
     "node pull is for docker:// registry images"),
    ({"IMPORTER_SOURCE": "registry", "IMPORTER_ENDPOINT": "oci-archive:/images/os.tar",
      "IMPORTER_PULL_METHOD": "node"}, "IMPORTER_PULL_METHOD",
     "node pull is for docker:// registry images"),
])
def test_bad_values_name_the_variable(env: dict[str, str], variable: str, reason: str) -> None:
    full = {"IMPORTER_ENDPOINT": "http://h/x", **env}
    if variable == "IMPORTER_ENDPOINT" and "IMPORTER_ENDPOINT" not in env:
        del full["IMPORTER_ENDPOINT"]
    with pytest.raises(errors.SettingsError) as e:
        settings.from_env(full)
    assert str(e.value) == f"{variable}: {reason}"


def test_worker_exits_1_naming_the_variable(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update({"IMPORTER_ENDPOINT": "http://127.0.0.1:1/x", "PREALLOCATION": "maybe",
                "IMPORTER_TERMINATION_LOG": str(tmp_path / "log")})
    p = subprocess.run([sys.executable, "-m", "importer"], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 1
    assert "Invalid settings: PREALLOCATION: 'maybe' is not a boolean (true/false)" in p.stderr

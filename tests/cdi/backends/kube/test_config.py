"""Finding the API server: in-cluster service account, kubeconfig flavours, exec plugins."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import pytest
import trustme

from cdi.backends import kube_config
from cdi.backends.kube import KubeStore
from tests.support.fakekube import FakeKube


def service_account(tmp_path: Path, token: str) -> Path:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(token + "\n")
    (sa / "ca.crt").write_text(trustme.CA().cert_pem.bytes().decode())
    (sa / "namespace").write_text("cdi-system")
    return sa


def test_in_cluster_reads_the_service_account(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    sa = service_account(tmp_path, "first")
    config = kube_config.load(service_account_dir=sa)
    assert (config.server, config.namespace) == ("https://10.96.0.1:443", "cdi-system")
    assert "first" not in repr(config)
    assert asyncio.run(config.authorization()) == "Bearer first"
    # The kubelet rotates the token: after a 401 the new one is read.
    (sa / "token").write_text("second\n")
    assert asyncio.run(config.authorization()) == "Bearer first"  # cached for a minute
    config.invalidate()
    assert asyncio.run(config.authorization()) == "Bearer second"


def test_in_cluster_without_a_token_says_so(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    with pytest.raises(kube_config.ConfigError, match="token"):
        kube_config.in_cluster(tmp_path)


def test_a_kubeconfig_reaches_the_server(fake: FakeKube, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "config")))
    config = kube_config.load()
    assert config.namespace == "cdi"

    async def main() -> str:
        async with KubeStore(config) as store:
            created = await store.create({"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": {"name": "x", "namespace": "ns"}})
            return str(created["metadata"]["uid"])

    assert asyncio.run(main())


def test_an_exec_plugin_supplies_the_token(fake: FakeKube, tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "assert info['kind'] == 'ExecCredential'\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',\n"
        "  'status': {'token': os.environ['TOKEN'],\n"
        "             'expirationTimestamp': '2999-01-01T00:00:00Z'}}))\n")
    ca = base64.b64encode(fake.ca.cert_pem.bytes()).decode()
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": fake.url,
                                               "certificate-authority-data": ca}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
            "args": [str(plugin)], "env": [{"name": "TOKEN", "value": fake.token}]}}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    config = kube_config.from_kubeconfig(path)

    async def main() -> list[str]:
        async with KubeStore(config) as store:
            await store.create({"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": "x", "namespace": "ns"}})
            return [o["metadata"]["name"] for o in (await store.list("ConfigMap")).items]

    assert asyncio.run(main()) == ["x"]


def test_a_failing_exec_plugin_is_named(tmp_path: Path) -> None:
    config = kube_config.Config(server="https://127.0.0.1:1", exec_plugin=kube_config.ExecPlugin(
        command=sys.executable, args=("-c", "import sys; sys.exit(3)")))
    with pytest.raises(kube_config.ConfigError, match="exited 3"):
        asyncio.run(config.authorization())


def test_client_certificates_from_inline_data(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("me")
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {
            "client-certificate-data": base64.b64encode(leaf.cert_chain_pems[0].bytes()).decode(),
            "client-key-data": base64.b64encode(leaf.private_key_pem.bytes()).decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    config = kube_config.from_kubeconfig(path)
    assert config.client_cert_pem is not None and config.insecure
    ctx = config.ssl_context()  # loads the pair, or raises
    assert not ctx.check_hostname
    assert asyncio.run(config.authorization()) is None


def test_missing_context_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("clusters: []\ncontexts: []\nusers: []\n")
    with pytest.raises(kube_config.ConfigError, match="current-context"):
        kube_config.from_kubeconfig(path)
    with pytest.raises(kube_config.ConfigError, match="no context named"):
        kube_config.from_kubeconfig(path, "nope")


def test_a_rotated_token_is_read_again_after_401(fake: FakeKube, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(fake.token)
    config = kube_config.Config(server=fake.url, ca_pem=fake.ca.cert_pem.bytes().decode(),
                                token_file=token_file)

    async def main() -> None:
        async with KubeStore(config) as store:
            await store.list("ConfigMap")  # the token is now cached
            fake.token = "rotated"  # the cluster moved on, and the kubelet wrote the file
            token_file.write_text("rotated\n")
            await store.list("ConfigMap")  # 401, read again, retried once

    asyncio.run(main())
    statuses = [q for m, p, q in fake.requests if p == "/api/v1/configmaps"]
    assert len(statuses) == 3  # ok, 401, ok


def test_an_unreachable_server_is_unavailable() -> None:
    import socket

    from cdi.backends.kube import Unavailable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    config = kube_config.Config(server=f"http://127.0.0.1:{port}", token="t")

    async def main() -> None:
        async with KubeStore(config, retry_delay=0.01) as store:
            with pytest.raises(Unavailable):
                await store.get("Pod", "x", "ns")

    asyncio.run(main())

"""server.json and the pointer file: what `cdi serve` writes and how the CLI finds it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cdi.cli import config


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def make_token(path: Path, value: str = "t0ken") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return path


def test_write_server_info(tmp_path: Path, config_home: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config.write_server_info(data, "http://127.0.0.1:1234", data / "api-token")
    expected = {"url": "http://127.0.0.1:1234", "token_file": str(data / "api-token")}
    for path in (data / "server.json", config_home / "cdi" / "current.json"):
        assert json.loads(path.read_text()) == expected
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.pointer_path() == config_home / "cdi" / "current.json"
    assert sorted(p.name for p in data.iterdir()) == ["server.json"], "no temp files left"


def test_find_server_order(tmp_path: Path, config_home: Path) -> None:
    with pytest.raises(config.ConfigError, match="no cdi server found"):
        config.find_server()

    first = tmp_path / "first"
    second = tmp_path / "second"
    config.write_server_info(first, "http://127.0.0.1:1", make_token(first / "tok", "one"))
    first.mkdir(exist_ok=True)
    second.mkdir()
    config.write_server_info(second, "http://127.0.0.1:2", make_token(second / "tok", "two"))

    latest = config.find_server()
    assert (latest.url, latest.token) == ("http://127.0.0.1:2", "two")
    assert "two" not in repr(latest)
    chosen = config.find_server(data_dir=first)
    assert (chosen.url, chosen.token) == ("http://127.0.0.1:1", "one")
    explicit = config.find_server(server="http://h:3/", token_file=first / "tok")
    assert (explicit.url, explicit.token) == ("http://h:3", "one")
    mixed = config.find_server(server="http://h:4", data_dir=second)
    assert (mixed.url, mixed.token) == ("http://h:4", "two")

    with pytest.raises(config.ConfigError, match="does not exist"):
        config.find_server(data_dir=tmp_path / "nothing")
    (second / "tok").write_text("\n")
    with pytest.raises(config.ConfigError, match="is empty"):
        config.find_server()
    (second / "tok").unlink()
    with pytest.raises(config.ConfigError, match="cannot read the API token"):
        config.find_server()

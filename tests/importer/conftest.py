"""Fixtures for running real imports: a volume layout in tmp_path and a runner."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from importer import settings as settings_mod
from importer.__main__ import run

MiB = 1 << 20


@dataclasses.dataclass
class Result:
    code: int
    message: str
    volume: Volume

    @property
    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.message)
        return data


@dataclasses.dataclass
class Volume:
    """Paths of one import: data dir, block stand-in, scratch, termination log."""

    root: Path
    block: bool = False
    block_size: int = 0
    scratch: bool = True

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def block_path(self) -> Path:
        return self.root / "block.img"

    @property
    def scratch_dir(self) -> Path:
        return self.root / "scratch"

    @property
    def termination_log(self) -> Path:
        return self.root / "termination-log"

    @property
    def disk(self) -> Path:
        return self.block_path if self.block else self.data_dir / "disk.img"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.block:
            with self.block_path.open("wb") as f:
                f.truncate(self.block_size)
        else:
            self.data_dir.mkdir(exist_ok=True)
        if self.scratch:
            self.scratch_dir.mkdir(exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "IMPORTER_DATA_DIR": str(self.data_dir),
            "IMPORTER_BLOCK_PATH": str(self.block_path),
            "IMPORTER_SCRATCH_DIR": str(self.scratch_dir),
            "IMPORTER_TERMINATION_LOG": str(self.termination_log),
            "IMPORTER_METRICS_ADDRESS": "",
            "IMPORTER_RETRY_BACKOFF": "0.05",
        }
        env.update(extra)
        return env


Importer = Callable[..., Result]


@pytest.fixture
def volume(tmp_path: Path) -> Callable[..., Volume]:
    count = 0

    def make(*, block: bool = False, block_size: int = 32 * MiB, scratch: bool = True) -> Volume:
        nonlocal count
        count += 1
        v = Volume(tmp_path / f"vol{count}", block=block, block_size=block_size, scratch=scratch)
        v.prepare()
        return v

    return make


@pytest.fixture
def import_in_process() -> Importer:
    """Run one import in this process (fast; for the big matrices)."""

    def go(vol: Volume, **env: str) -> Result:
        s = settings_mod.from_env(vol.env(**env))
        code, message = run(s)
        return Result(code, message, vol)

    return go


@pytest.fixture
def import_subprocess() -> Importer:
    """Run `python -m importer` as the pod would: exit code and termination log."""

    def go(vol: Volume, **env: str) -> Result:
        full = dict(os.environ)
        full.update(vol.env(**env))
        p = subprocess.run([sys.executable, "-m", "importer"], env=full, capture_output=True,
                           timeout=120, check=False)
        message = vol.termination_log.read_text() if vol.termination_log.exists() else ""
        return Result(p.returncode, message, vol)

    return go

"""The phase machine itself, with a scripted source."""

from __future__ import annotations

from pathlib import Path

import pytest

from importer import errors, settings
from importer.processor import Phase, Processor
from importer.progress import Progress
from importer.target import Target


class Scripted:
    """A source whose info() and transfer_file() return the phases it is given."""

    def __init__(self, info: Phase, after_transfer: Phase) -> None:
        self._info = info
        self._after = after_transfer
        self.calls: list[str] = []

    def info(self) -> Phase:
        self.calls.append("info")
        return self._info

    def transfer(self, scratch_dir: Path) -> Phase:
        self.calls.append("transfer")
        return self._after

    def transfer_file(self, target: Target) -> Phase:
        self.calls.append("transfer_file")
        return self._after

    def transfer_dir(self, data_dir: Path) -> Phase:
        self.calls.append("transfer_dir")
        return self._after

    def url(self) -> str:
        return ""

    def image_format(self) -> str:
        return "raw"

    def close(self) -> None:
        pass


def _processor(tmp_path: Path, source: Scripted) -> Processor:
    s = settings.from_env({"IMPORTER_SOURCE": "none", "IMPORTER_DATA_DIR": str(tmp_path),
                           "IMPORTER_BLOCK_PATH": str(tmp_path / "none"),
                           "IMPORTER_SCRATCH_DIR": str(tmp_path / "scratch")})
    return Processor(source, settings=s, target=Target(tmp_path / "disk.img", is_block=False,
                                                       capacity=1 << 20), progress=Progress())


def test_loop_detected(tmp_path: Path) -> None:
    source = Scripted(Phase.TRANSFER_DATA_FILE, Phase.TRANSFER_DATA_FILE)
    with pytest.raises(errors.PhaseLoop) as e:
        _processor(tmp_path, source).run()
    assert e.value.termination_message() == (
        "Unable to process data: loop detected on phase TransferDataFile")
    assert source.calls == ["info", "transfer_file"]


def test_unknown_phase(tmp_path: Path) -> None:
    source = Scripted(Phase.TRANSFER_DATA_DIR, Phase.VALIDATE_PRE_SCRATCH)
    with pytest.raises(errors.ProcessingError, match="unknown phase ValidatePreScratch"):
        _processor(tmp_path, source).run()


def test_pause_ends_the_run(tmp_path: Path) -> None:
    source = Scripted(Phase.TRANSFER_DATA_DIR, Phase.PAUSE)
    assert _processor(tmp_path, source).run() is Phase.PAUSE


def test_scratch_required_when_absent(tmp_path: Path) -> None:
    source = Scripted(Phase.TRANSFER_SCRATCH, Phase.COMPLETE)
    with pytest.raises(errors.ScratchSpaceRequired):
        _processor(tmp_path, source).run()
    assert source.calls == ["info"]

"""The import phase machine: Info -> Transfer* -> Convert -> Resize -> Complete.

This mirrors KubeVirt CDI's data processor.  The source decides, in ``info``,
which path its data takes (straight onto the volume, through scratch space and
qemu-img, or extracted as an archive); the processor runs the phases, refuses
to visit a phase twice (a loop is a bug, not a retry), and leaves conversion,
validation and resizing, which every source shares, in one place.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from importer import errors, qemu_img
from importer.progress import Progress
from importer.settings import Settings
from importer.target import Target

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    INFO = "Info"
    TRANSFER_SCRATCH = "TransferScratch"
    TRANSFER_DATA_DIR = "TransferDataDir"
    TRANSFER_DATA_FILE = "TransferDataFile"
    VALIDATE_PRE_SCRATCH = "ValidatePreScratch"
    CONVERT = "Convert"
    RESIZE = "Resize"
    COMPLETE = "Complete"
    PAUSE = "Pause"


class Source(Protocol):
    """What a data source offers the processor (CDI's DataSourceInterface)."""

    def info(self) -> Phase: ...

    def transfer(self, scratch_dir: Path) -> Phase:
        """Write the image into scratch space; return the next phase (Convert)."""
        ...

    def transfer_file(self, target: Target) -> Phase:
        """Write a raw image straight onto the target; return the next phase."""
        ...

    def transfer_dir(self, data_dir: Path) -> Phase:
        """Extract an archive into the data directory; return the next phase."""
        ...

    def url(self) -> str:
        """Where qemu-img reads the image from in the Convert phase."""
        ...

    def image_format(self) -> str: ...

    def close(self) -> None: ...


class Processor:
    def __init__(self, source: Source, *, settings: Settings, target: Target,
                 progress: Progress) -> None:
        self._source = source
        self._settings = settings
        self._target = target
        self._progress = progress
        self.preallocation_applied = False
        self._executors: dict[Phase, Callable[[], Phase]] = {
            Phase.INFO: source.info,
            Phase.TRANSFER_SCRATCH: self._transfer_scratch,
            Phase.TRANSFER_DATA_FILE: self._transfer_data_file,
            Phase.TRANSFER_DATA_DIR: self._transfer_data_dir,
            Phase.CONVERT: self._convert,
            Phase.RESIZE: self._resize,
        }

    def run(self) -> Phase:
        phase = Phase.INFO
        visited: set[Phase] = set()
        while phase not in (Phase.COMPLETE, Phase.PAUSE):
            if phase in visited:
                raise errors.PhaseLoop(phase=phase.value)
            visited.add(phase)
            executor = self._executors.get(phase)
            if executor is None:
                raise errors.ProcessingError(reason=f"unknown phase {phase.value}")
            log.info("PHASE %s", phase.value)
            phase = executor()
        self._progress.set_phase("complete")
        return phase

    def _transfer_scratch(self) -> Phase:
        scratch = self._settings.scratch_dir
        if not _usable_dir(scratch):
            raise errors.ScratchSpaceRequired()
        self._progress.set_phase("transfer")
        return self._source.transfer(scratch)

    def _transfer_data_file(self) -> Phase:
        self._progress.set_phase("transfer")
        next_phase = self._source.transfer_file(self._target)
        self.preallocation_applied = self._settings.preallocation
        return next_phase

    def _transfer_data_dir(self) -> Phase:
        if self._target.is_block:
            raise errors.ProcessingError(
                reason="content type archive needs a Filesystem volume, not a Block volume"
            )
        self._progress.set_phase("transfer")
        return self._source.transfer_dir(self._settings.data_dir)

    def _convert(self) -> Phase:
        url, fmt = self._source.url(), self._source.image_format()
        # What the user knows the image as: an HTTP URL, not the NBD socket qemu-img reads.
        shown = str(getattr(self._source, "display_name", lambda: url)())
        try:
            image = qemu_img.info(url, fmt=fmt)
        except errors.InvalidImage as e:
            raise errors.InvalidImage(image=shown, reason=e.reason.replace(url, shown)) from e
        qemu_img.validate(image, url=shown, available=self._target.capacity)
        try:
            qemu_img.check_complete(url, fmt=fmt)
        except errors.TruncatedImage as e:
            raise errors.TruncatedImage(image=shown, end=e.end, length=e.length) from e
        except errors.InvalidImage as e:
            raise errors.InvalidImage(image=shown, reason=e.reason.replace(url, shown)) from e
        self._progress.set_phase("convert")
        self._progress.set_total(image.virtual_size)
        if not self._target.is_block:
            self._target.path.unlink(missing_ok=True)
        try:
            qemu_img.convert(
                url,
                self._target.path,
                src_format=fmt,
                preallocation=self._settings.preallocation,
                target_exists=self._target.is_block,
                cache="none" if self._direct_io() else "writeback",
                progress=self._progress.set_percent,
            )
        except errors.QemuImgError as e:
            if url == shown:
                raise
            raise errors.QemuImgError(command=e.command.replace(url, shown), rc=e.rc,
                                      stderr=e.stderr.replace(url, shown)) from e
        self.preallocation_applied = self._settings.preallocation
        return Phase.RESIZE

    def _direct_io(self) -> bool:
        """CACHE_MODE=TRYNONE: bypass the page cache if the target accepts O_DIRECT."""
        if not self._settings.cache_mode_try_none:
            return False
        if self._target.is_block:
            probe, flags = self._target.path, os.O_RDONLY | os.O_DIRECT
        else:
            probe = self._target.path.parent / ".cdi-direct-io-probe"
            flags = os.O_WRONLY | os.O_CREAT | os.O_DIRECT
        try:
            os.close(os.open(probe, flags, 0o600))
        except OSError:
            log.info("CACHE O_DIRECT not supported on %s, using writeback", probe)
            return False
        finally:
            if not self._target.is_block:
                probe.unlink(missing_ok=True)
        return True

    def _resize(self) -> Phase:
        if not self._target.is_block:
            self._progress.set_phase("resize")
            size = self._target.path.stat().st_size
            if size > self._target.capacity:
                raise errors.ImageTooLarge(virtual=size, available=self._target.capacity)
            qemu_img.resize(self._target.path, self._target.capacity,
                            preallocation=self._settings.preallocation)
            self._target.path.chmod(0o660)
        self._target.fsync()
        return Phase.COMPLETE


def _usable_dir(path: Path) -> bool:
    try:
        return path.is_dir() and path.stat() is not None
    except OSError:
        return False

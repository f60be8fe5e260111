"""Blank source: an empty disk of the volume's usable size.

Filesystem volumes get a sparse (or, with preallocation, fully allocated)
``disk.img`` of CDI's usable size.  Block volumes are discarded so they read
as zeros (zero-filled and allocated with preallocation); CDI leaves a block
volume untouched without preallocation, but a reused device would then show
old data in a disk the user asked to be blank.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from importer import errors, qemu_img, target
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Settings

log = logging.getLogger(__name__)


def open(settings: Settings, *, progress: Progress) -> BlankSource:
    if settings.content_type == "archive":
        raise errors.BlankImageError(reason="Cannot create empty disk with content type archive")
    return BlankSource(settings, progress=progress)


class BlankSource:
    kind = "none"

    def __init__(self, settings: Settings, *, progress: Progress) -> None:
        self._settings = settings
        self._progress = progress

    def info(self) -> Phase:
        return Phase.TRANSFER_DATA_FILE

    def transfer_file(self, target_: target.Target) -> Phase:
        prealloc = self._settings.preallocation
        try:
            if target_.is_block:
                fd = os.open(target_.path, os.O_WRONLY)
                try:
                    target.zero_range(fd, 0, target_.capacity, allocate=prealloc)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                target_.path.unlink(missing_ok=True)
                qemu_img.create(target_.path, target_.capacity, preallocation=prealloc)
                target_.path.chmod(0o660)
        except (OSError, errors.QemuImgError) as e:
            raise errors.BlankImageError(reason=str(e)) from e
        log.info("BLANK size=%d block=%s preallocation=%s", target_.capacity,
                 target_.is_block, prealloc)
        return Phase.RESIZE

    def transfer(self, scratch_dir: Path) -> Phase:
        raise errors.ProcessingError(reason="a blank disk needs no scratch space")

    def transfer_dir(self, data_dir: Path) -> Phase:
        raise errors.ProcessingError(reason="a blank disk is not an archive")

    def url(self) -> str:
        return str(self._settings.target_file)

    def image_format(self) -> str:
        return "raw"

    def close(self) -> None:
        pass

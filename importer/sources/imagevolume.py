"""Registry source, node pull: the containerdisk the kubelet mounted as an image volume.

With ``IMPORTER_PULL_METHOD=node`` the node pulled the image, not us: on
Kubernetes the importer pod mounts it read-only as an OCI image volume at
``IMPORTER_IMAGE_DIR`` (``/containerdisk``), so its layers arrive already
merged (whiteouts applied) as a file system.  The disk is found by the rule
the pod-pull path applies to layer members (``registry.is_disk_path``: a
regular file under ``disk/``, not a whiteout; links are not disks), except
that a merged file system has no first layer to prefer: exactly one such
file must be there, as CDI's image server requires exactly one entry in
``/disk``.  An image with ``/sysroot`` or ``/ostree`` is a bootc image and is
refused, as CDI's server refuses it.

The file is local and never changes, so every path is the cheapest one:
raw or compressed raw streams onto the volume, an uncompressed image qemu-img
converts is read by qemu-img in place (no scratch space), and only a
compressed one goes through scratch.  The image's environment (CDI's
``*_KUBEVIRT_IO_*`` claim labels) is not visible through a volume, so a node
pull sets no labels.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from importer import errors, formats
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Settings
from importer.sources import registry, resumable

log = logging.getLogger(__name__)

BOOTC_DIRS = ("sysroot", "ostree")


class NotMounted(errors.ProcessingError):
    msg = ("the image volume is not mounted at {self.directory}: the node did not mount the "
           "image (pullMethod node needs Kubernetes image volumes)")
    directory: Path


class NoDisk(registry.NoDiskFound):
    msg = registry.NoDiskFound.msg + ": no regular file under {self.directory}"
    directory: Path


class SeveralDisks(errors.ProcessingError):
    msg = ("Invalid container image: {self.directory} holds {self.count} files ({self.names}); "
           "a containerdisk holds exactly one disk image file")
    directory: Path
    count: int
    names: str


def open(settings: Settings, *, progress: Progress) -> ImageVolumeSource:
    return ImageVolumeSource(settings, progress=progress)


def find_disk(root: Path) -> Path:
    """The one disk file of the containerdisk mounted at ROOT."""
    if not root.is_dir():
        raise NotMounted(directory=root)
    if any((root / d).is_dir() for d in BOOTC_DIRS):
        raise registry.BootcImage()
    found: list[Path] = []
    for top, dirs, files in os.walk(root / "disk"):  # links to directories are not followed
        dirs.sort()
        for name in sorted(files):
            path = Path(top) / name
            if registry.is_disk_path(path.relative_to(root).as_posix()) and \
                    stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    if not found:
        raise NoDisk(directory=root / "disk")
    if len(found) > 1:
        names = ", ".join(p.relative_to(root / "disk").as_posix() for p in found)
        raise SeveralDisks(directory=root / "disk", count=len(found), names=names)
    return found[0]


class _Counting:
    """A file read for the copy loop, counted as read bytes of the import's progress."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self._file = path.open("rb", buffering=0)
        self._progress = progress

    def readinto(self, buf: memoryview) -> int:
        n = self._file.readinto(buf) or 0
        self._progress.add_read(n)
        return n

    def close(self) -> None:
        self._file.close()


class ImageVolumeSource(resumable.ResumableSource):
    kind = "registry"

    def __init__(self, settings: Settings, *, progress: Progress) -> None:
        registry.require_kubevirt(settings)
        self._settings = settings
        self._progress = progress
        self._scratch_image: Path | None = None
        self._disk = find_disk(settings.image_dir)
        self._size = self._disk.stat().st_size
        self._file = _Counting(self._disk, progress)
        self._convert_url = ""

    def info(self) -> Phase:
        self._progress.set_total(self._size)
        self._detected = formats.detect(self._file)
        log.info("DISK image=%s path=%s size=%d format=%s", self._settings.endpoint,
                 self._disk, self._size, "/".join(self._detected.layers))
        if not self._detected.needs_conversion:
            return Phase.TRANSFER_DATA_FILE
        if not self._detected.compressed:
            self._convert_url = str(self._disk)  # qemu-img reads it where it is
            return Phase.CONVERT
        return Phase.TRANSFER_SCRATCH

    # What ResumableSource needs: a local file has a length and never drops.

    def _known_length(self) -> int | None:
        return self._size

    def _finish_stream(self) -> None:
        pass

    def _restart(self, why: errors.RestartRequired) -> None:
        raise errors.ProcessingError(reason=f"reading {self._disk}: {why}")

    def transfer_dir(self, data_dir: Path) -> Phase:
        raise errors.ProcessingError(reason="a registry image cannot be imported as an archive")

    def url(self) -> str:
        return self._convert_url

    def image_format(self) -> str:
        return self._detected.format

    def labels(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self._file.close()
        if self._scratch_image is not None:
            self._scratch_image.unlink(missing_ok=True)

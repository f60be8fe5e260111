"""The transfer phases shared by sources that stream one object and resume it.

HTTP and S3 sources both read one body, detect its format, and continue after a
dropped connection (``errors.RestartRequired`` from the body: the bytes so far
are dropped and the stream starts again where the source says).  Writing that
stream onto the volume, into scratch space or into an archive directory is the
same for both, so it lives here once; a source supplies the stream
(``_detected``), how to end it (``_finish_stream``), how to restart it
(``_restart``) and its length if known (``_known_length``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from importer import archive, errors, formats, stream, target
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Settings

log = logging.getLogger(__name__)

SCRATCH_IMAGE = "tmpimage"


class ResumableSource:
    _settings: Settings
    _progress: Progress
    _detected: formats.Detected
    _scratch_image: Path | None
    _convert_url: str

    def _known_length(self) -> int | None:
        """The body's length in bytes, if the source said."""
        raise NotImplementedError

    def _finish_stream(self) -> None:
        """Check the stream's end (length, checksum); raise RestartRequired to go again."""
        raise NotImplementedError

    def _restart(self, why: errors.RestartRequired) -> None:
        """Reopen the stream after WHY (a dropped connection, a changed object)."""
        raise NotImplementedError

    def transfer_file(self, target_: target.Target) -> Phase:
        total = None
        length = self._known_length()
        if not self._detected.compressed and length is not None:
            total = length
            if total > target_.capacity:
                raise errors.ImageTooLarge(virtual=total, available=target_.capacity)
        with target_.open_writer(preallocate=self._settings.preallocation) as w:
            try:
                while True:
                    try:
                        stream.copy(self._detected.reader, w, total=total)
                        self._finish_stream()
                        break
                    except errors.RestartRequired as why:
                        w.reset()
                        self._restart(why)
                size = w.finish()
            except errors.Error:
                w.close()
                target_.remove()
                raise
        self._progress.set_written(size)
        log.info("WROTE size=%d data=%d", size, w.data_bytes)
        return Phase.RESIZE

    def transfer(self, scratch_dir: Path) -> Phase:
        path = scratch_dir / SCRATCH_IMAGE
        st = shutil.disk_usage(scratch_dir)
        with target.Writer.open(path, block=False, capacity=st.free, preallocate=False,
                                keep_cache=True) as w:
            try:
                while True:
                    try:
                        stream.copy(self._detected.reader, w)
                        self._finish_stream()
                        break
                    except errors.RestartRequired as why:
                        w.reset()
                        self._restart(why)
                w.finish()
            except errors.Error:
                path.unlink(missing_ok=True)
                raise
        self._scratch_image = path
        self._convert_url = str(path)
        return Phase.CONVERT

    def transfer_dir(self, data_dir: Path) -> Phase:
        data_dir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                archive.extract(self._detected.reader, data_dir)
                self._finish_stream()
                break
            except errors.RestartRequired as why:
                target.clear_dir(data_dir)
                self._restart(why)
            except errors.Error:
                target.clear_dir(data_dir)
                raise
        target.fsync_dir(data_dir)
        return Phase.COMPLETE

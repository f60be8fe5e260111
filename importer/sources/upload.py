"""Upload source: the body of one upload request, fed through the import phases.

The upload server hands the processor this source instead of a URL, so an
upload takes the paths an import takes: raw and compressed raw straight onto
the volume (sparse), convertible formats through scratch space and qemu-img,
archives extracted.  Two things are the upload's own: a raw image can be
written from an offset and checkpointed (resumable uploads), and
``received`` is called once the body is complete and its checksum and
(for scratch images) its header validated, which is when an async upload is
answered.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from importer import archive, errors, formats, qemu_img, stream, target
from importer.processor import Phase
from importer.progress import Progress
from importer.settings import Checksum, Settings
from importer.upload import body as body_mod
from importer.upload import resume, sparse

log = logging.getLogger(__name__)

SCRATCH_IMAGE = "tmpimage"


class UploadInterrupted(body_mod.ClientDisconnected):
    """The client went away during a resumable upload; OFFSET bytes are durable."""

    msg = ("the upload was cut short after {self.received} bytes: {self.reason}; "
           "it can continue at offset {self.offset}")
    offset: int


class UploadSource:
    kind = "upload"

    def __init__(self, body: formats.Reader, *, settings: Settings, target: target.Target,
                 progress: Progress, archive: bool = False, checksum: Checksum | None = None,
                 length: int | None = None, offset: int = 0,
                 tracker: resume.Tracker | None = None,
                 received: Callable[[], None] = lambda: None, sparse: bool = False) -> None:
        """BODY is the image (or tar) stream; LENGTH its size if known.

        OFFSET > 0 continues a raw upload at that byte; TRACKER, if enabled,
        makes a raw upload resumable.  SPARSE: BODY is a sparse stream
        (``upload.sparse``) of a raw image, not the image itself.
        """
        self._body = body
        self._settings = settings
        self._target = target
        self._progress = progress
        self._archive = archive
        self._checksum = checksum
        self._length = length
        self._offset = offset
        self._tracker = tracker if tracker is not None and tracker.enabled else None
        self._received = received
        self._hashing: stream.Hashing | None = None
        self._detected: formats.Detected | None = None
        self._scratch_image: Path | None = None
        self._sparse = sparse
        self.image_end: int | None = None  # a sparse upload's image size, once written

    # -- the processor's interface ---------------------------------------------

    def info(self) -> Phase:
        if self._sparse:
            log.info("UPLOAD sparse stream offset=%d", self._offset)
            return Phase.TRANSFER_DATA_FILE  # raw by declaration; checked as it comes
        if self._offset:
            log.info("UPLOAD continues at offset=%d", self._offset)
            return Phase.TRANSFER_DATA_FILE  # only raw uploads are resumable
        reader = self._body
        if self._checksum is not None:
            self._hashing = stream.Hashing(self._body, self._checksum)
            reader = self._hashing
        d = self._detected = formats.detect(reader)
        log.info("UPLOAD layers=%s length=%s", "/".join(d.layers), self._length)
        if self._archive:
            if d.needs_conversion:
                raise errors.UnsupportedFormat(format=d.format, image="upload (expected a tar)")
            return Phase.TRANSFER_DATA_DIR
        return Phase.TRANSFER_SCRATCH if d.needs_conversion else Phase.TRANSFER_DATA_FILE

    def transfer_file(self, target_: target.Target) -> Phase:
        if self._sparse:
            return self._transfer_sparse(target_)
        d = self._detected
        # Only a raw, uncompressed body lands on the volume byte for byte.
        byte_for_byte = self._offset > 0 or (d is not None and d.layers == ["raw"])
        tracker = self._tracker if byte_for_byte else None
        total = None
        if self._length is not None and (d is None or not d.compressed):
            total = self._offset + self._length
            if total > target_.capacity:
                raise errors.ImageTooLarge(virtual=total, available=target_.capacity)
        with target_.open_writer(preallocate=self._settings.preallocation,
                                 offset=self._offset) as w:
            if d is None:
                reader, self._hashing = resume.continued(
                    self._body, path=target_.path, offset=self._offset, checksum=self._checksum)
            else:
                reader = d.reader
            checkpointing = None
            if tracker is not None:
                checkpointing = resume.Checkpointing(w, tracker)
                if not self._offset:
                    tracker.save(0)
            try:
                stream.copy(reader, checkpointing or w, total=total)
            except body_mod.ClientDisconnected as e:
                if checkpointing is None:
                    raise
                offset = checkpointing.checkpoint()
                raise UploadInterrupted(received=e.received, reason=e.reason,
                                        offset=offset) from e
            self._finish_stream()
            size = w.finish()
        self._progress.set_written(size)
        log.info("WROTE size=%d data=%d", size, w.data_bytes)
        self._received()
        return Phase.RESIZE

    def _transfer_sparse(self, target_: target.Target) -> Phase:
        """Write a sparse stream's frames at their offsets; the gaps read as zeros.

        Resumable like a plain raw upload: the writer thread checkpoints the
        durable offset (the image bytes below it are final, holes included),
        and a continuation's frames start at or past it.  A checksum covers the
        whole image, zeros included, as for a plain upload.
        """
        size = sparse.read_head(self._body)
        if size > target_.capacity:
            raise errors.ImageTooLarge(virtual=size, available=target_.capacity)
        if self._offset > size:
            raise sparse.MalformedStream(reason=f"the upload continues at offset "
                                                f"{self._offset}, past the image size {size}")
        hashing = None
        if self._checksum is not None:
            hashing = sparse.Hashing(self._checksum)
            resume.replay(target_.path, self._offset, hashing.data)
        with target_.open_writer(preallocate=self._settings.preallocation,
                                 offset=self._offset, direct=True) as w:
            checkpointing = None
            if self._tracker is not None:
                checkpointing = resume.Checkpointing(w, self._tracker)
                if not self._offset:
                    self._tracker.save(0)
            try:
                frames = sparse.write_frames(
                    self._body, w, size=size, start=self._offset, progress=self._progress,
                    raw_only=True, on_data=hashing.data if hashing is not None else None,
                    after_write=checkpointing.tick if checkpointing is not None else None)
            except body_mod.ClientDisconnected as e:
                if checkpointing is None:
                    raise
                offset = checkpointing.checkpoint()
                raise UploadInterrupted(received=e.received, reason=e.reason,
                                        offset=offset) from e
            if hashing is not None:
                hashing.verify(size)
            sparse.skip_to(w, size)
            self.image_end = w.finish()
        self._progress.set_written(w.data_bytes)
        log.info("WROTE size=%d data=%d frames=%d", size, w.data_bytes, frames)
        self._received()
        return Phase.RESIZE

    def transfer(self, scratch_dir: Path) -> Phase:
        assert self._detected is not None
        path = self._scratch_image = scratch_dir / SCRATCH_IMAGE
        free = shutil.disk_usage(scratch_dir).free
        with target.Writer.open(path, block=False, capacity=free, preallocate=False,
                                keep_cache=True) as w:
            stream.copy(self._detected.reader, w)
            self._finish_stream()
            w.finish()
        # CDI's ValidatePause: the header is checked before an async upload is answered;
        # the Convert phase checks it again right before converting.
        image = qemu_img.info(str(path), fmt=self._detected.format)
        qemu_img.validate(image, url=str(path), available=self._target.capacity)
        self._received()
        return Phase.CONVERT

    def transfer_dir(self, data_dir: Path) -> Phase:
        assert self._detected is not None
        data_dir.mkdir(parents=True, exist_ok=True)
        archive.extract(self._detected.reader, data_dir)
        self._finish_stream()
        target.fsync_dir(data_dir)
        self._received()
        return Phase.COMPLETE

    def url(self) -> str:
        return str(self._scratch_image or "")

    def image_format(self) -> str:
        return self._detected.format if self._detected is not None else "raw"

    def close(self) -> None:
        if self._scratch_image is not None:
            self._scratch_image.unlink(missing_ok=True)

    def _finish_stream(self) -> None:
        if self._hashing is not None:
            self._hashing.drain()
            self._hashing.verify()

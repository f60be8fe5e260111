"""One upload at a time: admission, processing, cleanup, and what the client is told.

``Uploads`` is the upload server's state (idle, busy, done, closed by the
deadline) behind one lock.  It admits a single upload (503 while one runs,
409 once one completed), runs it through the import processor in the
request's thread, and is the one place that turns failures into status codes:
the client gets CDI's texts, the log gets the details, and nothing
half-written stays on the volume unless it is a resumable upload that can
continue.  The HTTP framing around it lives in ``server``.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from importer import errors, settings, target
from importer.processor import Processor
from importer.progress import Progress
from importer.sources.upload import UploadInterrupted, UploadSource
from importer.upload import body as body_mod
from importer.upload import clone, resume
from importer.upload.config import UploadConfig

log = logging.getLogger(__name__)

DRAIN_LIMIT = 16 << 20  # bytes of a refused body read (and dropped) so the client sees the reply
PREFIX = "Saving stream failed: "
NO_CAPACITY = PREFIX + "effective image size is larger than the reported available storage: "
DEADLINE_MESSAGE = json.dumps({"message": "Deadline Passed", "deadlinePassed": True})

Kind = Literal["raw", "form", "archive", "clone"]

@dataclasses.dataclass(frozen=True)
class Route:
    kind: Kind
    asynchronous: bool


# Failures caused by what the client sent: 400 with the reason.
BAD_INPUT: tuple[type[Exception], ...] = (
    errors.InvalidImage, errors.UnsupportedFormat, errors.InvalidBackingFile,
    errors.InvalidDataFile, errors.CorruptStream, errors.UnsafeArchive, errors.ChecksumMismatch,
    errors.QemuImgError, body_mod.MalformedBody, body_mod.ClientDisconnected,
)


class HTTPError(Exception):
    def __init__(self, status: int, text: str, payload: dict[str, Any] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.payload = payload


@dataclasses.dataclass
class Request:
    route: Route
    body: body_mod.LengthBody | body_mod.ChunkedBody
    length: int | None  # Content-Length; None when chunked
    offset: int | None  # ?offset=N
    checksum: settings.Checksum | None  # X-Checksum
    boundary: bytes  # form endpoints
    sparse: bool = False  # the body is a sparse stream (upload.sparse), not the image


Reply = Callable[[int, str], None]


def classify(e: BaseException) -> tuple[int, str]:
    """The status and text the client gets for a failed upload."""
    if isinstance(e, HTTPError):
        return e.status, e.text
    if _no_capacity(e):
        return 400, NO_CAPACITY + str(e)
    if isinstance(e, BAD_INPUT):
        return 400, PREFIX + str(e)
    if isinstance(e, errors.ScratchSpaceRequired):
        return 500, PREFIX + str(e)
    return 500, PREFIX + "internal error, check the upload server log"


def _no_capacity(e: BaseException) -> bool:
    """CDI's IsNoCapacityError: the image does not fit, or the volume ran out of space."""
    if isinstance(e, errors.ImageTooLarge | errors.StreamTooLarge):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = e.stderr if isinstance(e, errors.QemuImgError) else str(e)
    return isinstance(e, errors.ProcessingError) and "no space left on device" in text.lower()


class Uploads:
    """The one upload this server accepts: admission, processing, cleanup, the result."""

    def __init__(self, config: UploadConfig, progress: Progress) -> None:
        self._config = config
        self._progress = progress
        self._cond = threading.Condition()
        self._state: Literal["idle", "busy", "done", "closed"] = "idle"
        self._result: tuple[int, str] | None = None
        self._deadline_passed = False
        self._completed_offset = 0
        s = config.importer
        self.tracker = resume.Tracker.load(config.resume_state_file,
                                           s.block_path if s.is_block else s.target_file,
                                           block=s.is_block)

    def status(self) -> dict[str, Any]:
        """The resume protocol's answer: durable offset, complete, in progress."""
        with self._cond:
            done = self._state == "done"
            return {"offset": self._completed_offset if done else self.tracker.offset,
                    "complete": done, "inProgress": self._state == "busy"}

    def check(self, offset: int | None = None) -> None:
        """Raise the HTTPError a new upload would get now, if any."""
        with self._cond:
            if self._state == "done":
                raise HTTPError(409, "Upload already complete")
            if self._state == "busy":
                raise HTTPError(503, "Upload already in progress")
            if self._state == "closed" or self._deadline_passed:
                raise HTTPError(503, "The upload deadline has passed")
            if offset is not None and offset != self.tracker.offset:
                raise HTTPError(409, f"offset {offset} does not match the upload's durable "
                                     f"offset {self.tracker.offset}",
                                payload={"offset": self.tracker.offset, "complete": False,
                                         "message": "offset mismatch"})

    def run(self, req: Request, reply: Reply) -> None:
        """Take the upload, or raise HTTPError before reading its body."""
        with self._cond:
            self.check(req.offset)
            self._state = "busy"
        if req.route.kind == "clone":
            self._clone(req, reply)
            return
        s = self._config.importer
        answered = False

        def received() -> None:
            nonlocal answered
            if not req.body.drain(DRAIN_LIMIT):
                raise body_mod.MalformedBody(reason="unexpected data after the end of the image")
            if req.route.asynchronous:
                reply(200, "")
                answered = True
                log.info("UPLOAD received, answered; processing goes on")

        started = time.monotonic()
        self._progress.restart()
        self._progress.set_total(req.length)
        req.body.progress = self._progress
        tgt: target.Target | None = None
        try:
            tgt = target.Target.from_settings(s)
            kind = req.route.kind
            if kind == "archive" and tgt.is_block:
                raise HTTPError(400, PREFIX + "content type archive needs a Filesystem volume, "
                                              "not a Block volume")
            if not req.offset:
                self.tracker.clear()  # a new upload from byte 0 replaces an interrupted one
            reader: body_mod.Body | body_mod.FormFile = req.body
            if kind == "form":
                reader = body_mod.FormFile(req.body, req.boundary)
            source = UploadSource(
                reader, settings=s, target=tgt, progress=self._progress,
                archive=kind == "archive", checksum=req.checksum,
                length=req.length if kind == "raw" else None, offset=req.offset or 0,
                tracker=self.tracker if kind == "raw" else None, received=received,
                sparse=req.sparse)
            try:
                processor = Processor(source, settings=s, target=tgt, progress=self._progress)
                processor.run()
            finally:
                source.close()
            self.tracker.clear()
        except Exception as e:
            self._failed(e, req, reply, tgt, answered=answered)
            return
        with self._cond:
            self._state = "done"
            self._completed_offset = (source.image_end if source.image_end is not None
                                      else (req.offset or 0) + req.body.received)
        log.info("UPLOAD complete seconds=%.2f bytes=%d", time.monotonic() - started,
                 req.body.received)
        if not answered:
            reply(200, "")
        self._finish(0, json.dumps({
            "message": "Upload Complete",
            "scratchSpaceRequired": False,
            "preallocationApplied": processor.preallocation_applied,
        }))

    def _clone(self, req: Request, reply: Reply) -> None:
        """Take a sparse clone stream (upload.clone) instead of an image; sync only."""
        started = time.monotonic()
        self._progress.restart()
        tgt: target.Target | None = None
        try:
            tgt = target.Target.from_settings(self._config.importer)
            self.tracker.clear()
            self._progress.set_phase("transfer")
            result = clone.receive(req.body, tgt, preallocate=self._config.importer.preallocation,
                                   progress=self._progress)
        except Exception as e:
            self._failed(e, req, reply, tgt, answered=False)
            return
        self._progress.set_written(result.data_bytes)
        self._progress.set_percent(100.0)
        self._progress.set_phase("complete")
        with self._cond:
            self._state = "done"
            self._completed_offset = req.body.received
        log.info("CLONE complete seconds=%.2f bytes=%d", time.monotonic() - started,
                 req.body.received)
        reply(200, "")
        self._finish(0, json.dumps({"message": "Clone Complete",
                                    "preallocationApplied": result.preallocated}))

    def _failed(self, e: Exception, req: Request, reply: Reply, tgt: target.Target | None,
                *, answered: bool) -> None:
        status, text = classify(e)
        if status >= 500:
            log.error("UPLOAD failed status=%d: %s", status, text, exc_info=e)
        else:
            log.warning("UPLOAD failed status=%d: %s", status, text)
        if isinstance(e, UploadInterrupted):
            log.info("RESUME possible at offset=%d", e.offset)
        else:
            self._discard(tgt, req.route.kind)
        if answered:  # async: the client was told 200; the pod's exit tells the controller
            message = (e.termination_message() if isinstance(e, errors.Error)
                       else f"Unable to process data: {type(e).__name__}: {e}")
            self._finish(1, message)
            return
        with self._cond:
            self._state = "idle"
            self._cond.notify_all()
        if not isinstance(e, body_mod.ClientDisconnected):
            req.body.drain(DRAIN_LIMIT)
        reply(status, text)

    def _discard(self, tgt: target.Target | None, kind: Kind) -> None:
        """Leave nothing half-written: no state file, no image, no half-extracted archive."""
        try:
            self.tracker.clear()
            if tgt is None:
                return
            if kind == "archive":
                if self._config.importer.data_dir.is_dir():
                    target.clear_dir(self._config.importer.data_dir)
            else:
                tgt.remove()
        except OSError:
            log.exception("CLEANUP failed")

    def _finish(self, code: int, message: str) -> None:
        with self._cond:
            if self._result is None:
                self._result = (code, message)
            self._cond.notify_all()

    def wait(self, deadline: datetime.datetime | None) -> tuple[int, str]:
        """Block until the upload completed (or failed after an async reply) or the deadline."""
        with self._cond:
            while self._result is None:
                timeout = None
                if deadline is not None and not self._deadline_passed:
                    timeout = (deadline - datetime.datetime.now(datetime.UTC)).total_seconds()
                    if timeout <= 0:
                        self._deadline_passed = True
                        timeout = None
                if self._deadline_passed and self._state == "idle":
                    self._state = "closed"
                    log.error("DEADLINE %s passed without a completed upload",
                              deadline.isoformat() if deadline else "")
                    self._result = (1, DEADLINE_MESSAGE)
                    break
                self._cond.wait(timeout)
            return self._result

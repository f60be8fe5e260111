"""Clone mode of the upload server: it takes one sparse stream from a clone source.

KubeVirt CDI's host-assisted clone sends the whole source (a tar of the
filesystem, or every byte of the block device) snappy-compressed, zeros and
all.  Ours sends only the source's data: the clone source worker
(``importer.clonesource``) finds the allocated extents and skips all-zero
blocks inside them, and frames what is left with its offset.  The upload
server, started in clone mode (``UPLOAD_CLONE=true``), writes each frame at
its offset with the sparse ``target.Writer``, so a hole in the source stays a
hole on the target, whichever volume modes the two have (the payload is the
disk image either way).  ``docs/clone.md`` describes the format for other
implementations.

The body is the sparse stream (``importer.upload.sparse``, its wire format),
sent to ``POST /v1beta1/upload`` with ``x-cdi-content-type: sparse-clone``.
Anything malformed is refused with 400 and nothing is kept.
"""

from __future__ import annotations

import dataclasses
import logging

from importer import errors, target
from importer.formats import Reader
from importer.progress import Progress
from importer.upload import sparse

log = logging.getLogger(__name__)

HEADER = "x-cdi-content-type"
CONTENT_TYPE = "sparse-clone"
# CDI's clone stream types: a snappy-compressed tar or device; not spoken here.
CDI_TYPES = ("filesystem-clone", "blockdevice-clone")
_TRUE = {"true", "1", "t", "yes"}
_FALSE = {"false", "0", "f", "no", ""}


class MalformedStream(sparse.MalformedStream):
    """The body is not a well-formed sparse clone stream (a 400)."""

    msg = "malformed clone stream: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Received:
    size: int  # the image's virtual size
    frames: int  # data frames received
    data_bytes: int  # bytes written (frame data that was not zeros)
    preallocated: bool


def mode_from_env(value: str | None) -> bool:
    """``UPLOAD_CLONE``: whether the upload server takes a clone instead of an upload."""
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise errors.SettingsError(variable="UPLOAD_CLONE",
                               reason=f"{value!r} is not a boolean (true/false)")


def refusal(content_type: str | None, *, clone_mode: bool, sync_upload: bool,
            offset: bool) -> str | None:
    """Why a POST cannot be taken as (or, in clone mode, instead of) a clone; None if it can.

    A server in clone mode takes only a sparse clone stream, and only a server
    in clone mode takes one: the two must never be confused.  SYNC_UPLOAD: the
    POST went to ``/v1beta1/upload`` (or v1alpha1); OFFSET: it has ``?offset``.
    """
    wanted = (content_type or "").strip().lower()
    if wanted == CONTENT_TYPE and not clone_mode:
        return (f"{HEADER}: {CONTENT_TYPE} refused: this upload server is not in clone mode "
                "(a clone needs an upload server started for it, with UPLOAD_CLONE=true)")
    if not clone_mode:
        return None
    if wanted in CDI_TYPES:
        return (f"{HEADER}: {wanted} (CDI's snappy clone stream) is not supported: the clone "
                f"source must send {CONTENT_TYPE}")
    if wanted != CONTENT_TYPE:
        return (f"this upload server is in clone mode: it takes only a clone, POST "
                f"/v1beta1/upload with {HEADER}: {CONTENT_TYPE}")
    if not sync_upload:
        return f"a {CONTENT_TYPE} stream goes to /v1beta1/upload"
    if offset:
        return "a clone cannot continue at an offset: it starts again from byte 0"
    return None


def receive(body: Reader, tgt: target.Target, *, preallocate: bool,
            progress: Progress | None = None) -> Received:
    """Write the sparse clone stream BODY onto TGT; raise on anything malformed.

    The target is rewritten from byte 0: a filesystem volume's disk.img is
    truncated and grown to the declared size, a block volume has every byte
    outside the frames discarded (read as zeros).  With PREALLOCATE the whole
    image is allocated.  Frame data is written as it comes, with O_DIRECT where
    it is aligned (``target.Writer.write_data``): the source skipped the zero
    blocks already, and the gaps between frames stay holes.  This thread reads
    and checks the frames into page-aligned buffers; a writer thread writes
    them, so the network and the disk work at once.
    PROGRESS counts the bytes of the frames' data as bytes read (there is no
    total to count them against: the source knows how much data it has).
    """
    size = sparse.read_head(body, MalformedStream)
    if size > tgt.capacity:
        raise errors.ImageTooLarge(virtual=size, available=tgt.capacity)
    log.info("CLONE size=%d capacity=%d block=%s preallocate=%s", size, tgt.capacity,
             tgt.is_block, preallocate)
    with tgt.open_writer(preallocate=preallocate, direct=True) as w:
        frames = sparse.write_frames(body, w, size=size, progress=progress,
                                     error=MalformedStream)
        # The rest reads as zeros: a file is truncated to SIZE, a device discarded
        # (or, preallocating, zero-allocated) up to its end.
        sparse.skip_to(w, tgt.capacity if tgt.is_block else size)
        w.finish()
        data = w.data_bytes
    log.info("CLONE received size=%d frames=%d data=%d", size, frames, data)
    return Received(size=size, frames=frames, data_bytes=data, preallocated=preallocate)


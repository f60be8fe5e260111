"""The importer's errors, and how each one reaches the user.

Every error carries its facts as attributes and renders its message from a
template, so callers raise ``errors.ImageTooLarge(virtual=..., available=...)``
and the text stays the same everywhere.  The text of each class matches what
KubeVirt CDI prints, because controllers (ours and CDI's) match on it.

Tree::

    Error
    +-- SettingsError          bad environment value; exit 1
    +-- SourceError            "Unable to connect to <kind> data source: ..."; exit 1
    |   +-- HTTPStatusError    the server answered something other than 200
    +-- ProcessingError        "Unable to process data: ..."; exit 1
    |   +-- TransferError      the connection failed and could not be resumed
    |   +-- CorruptStream      a compressed or archived stream is damaged
    |   +-- InvalidImage       qemu-img refused the image
    |   +-- UnsupportedFormat
    |   +-- InvalidBackingFile
    |   +-- InvalidDataFile
    |   +-- ImageTooLarge / StreamTooLarge   the image does not fit the volume
    |   +-- UnsafeArchive      an archive member would escape the volume
    |   +-- QemuImgError       qemu-img failed (command, exit code, stderr)
    |   +-- ChecksumMismatch   fatal: reported with exit 0 so the pod is not retried
    |   +-- PhaseLoop
    +-- ScratchSpaceRequired   not a failure: the controller must add scratch space
    +-- BlankImageError        "Unable to create blank image: ..."; exit 1
    +-- RestartRequired        internal: a transfer must begin again from byte 0

``termination_message()`` gives the text written to the termination log; the
worker's ``__main__`` is the only place that turns an error into an exit code.
"""

from __future__ import annotations

from typing import Any


class Error(Exception):
    msg = "override in a subclass"
    prefix = ""

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        for name, value in fields.items():
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.msg.format(self=self)

    def termination_message(self) -> str:
        return f"{self.prefix}{self}"


class SettingsError(Error):
    msg = "{self.variable}: {self.reason}"
    variable: str
    reason: str


class SourceError(Error):
    """The source could not be opened; nothing was written."""

    msg = "{self.reason}"
    kind = "http"
    reason: str

    def termination_message(self) -> str:
        return f"Unable to connect to {self.kind} data source: {self}"


class HTTPStatusError(SourceError):
    msg = "expected status code 200, got {self.status}. Status: {self.status} {self.status_text}"
    status: int
    status_text: str


class ProcessingError(Error):
    prefix = "Unable to process data: "
    msg = "{self.reason}"
    reason: str


class TransferError(ProcessingError):
    msg = (
        "transfer of {self.url} failed after {self.attempts} attempts at byte {self.offset}: "
        "{self.reason}"
    )
    url: str
    attempts: int
    offset: int


class CorruptStream(ProcessingError):
    msg = "the {self.format} stream is damaged: {self.reason}"
    format: str


class InvalidImage(ProcessingError):
    msg = "image {self.image} is invalid: {self.reason}"
    image: str


class UnsupportedFormat(ProcessingError):
    msg = "Invalid format {self.format} for image {self.image}"
    format: str
    image: str


class InvalidBackingFile(ProcessingError):
    msg = "Image {self.image} is invalid because it has invalid backing file {self.backing}"
    image: str
    backing: str


class InvalidDataFile(ProcessingError):
    msg = "Image {self.image} is invalid because it has an external data file {self.data_file}"
    image: str
    data_file: str


class TruncatedImage(InvalidImage):
    msg = ("Image {self.image} is invalid because it is truncated: its data reaches byte "
           "{self.end} but the file ends at byte {self.length}")
    image: str
    end: int
    length: int


class ImageTooLarge(ProcessingError):
    msg = (
        "virtual image size {self.virtual} is larger than the reported available storage "
        "{self.available}. A larger PVC is required"
    )
    virtual: int
    available: int


class StreamTooLarge(ProcessingError):
    """Like ImageTooLarge, for a stream whose final size is not known in advance."""

    msg = (
        "image size (more than {self.read} bytes) is larger than the reported available "
        "storage {self.available}. A larger PVC is required"
    )
    read: int
    available: int


class UnsafeArchive(ProcessingError):
    msg = "archive member {self.member!r} refused: {self.reason}"
    member: str


class QemuImgError(ProcessingError):
    msg = "{self.command} failed with exit code {self.rc}: {self.stderr}"
    command: str
    rc: int
    stderr: str


class ChecksumMismatch(ProcessingError):
    msg = (
        "checksum validation failed: checksum mismatch: expected {self.algorithm}:{self.expected}, "
        "calculated {self.algorithm}:{self.calculated}"
    )
    algorithm: str
    expected: str
    calculated: str


class PhaseLoop(ProcessingError):
    msg = "loop detected on phase {self.phase}"
    phase: str


class ScratchSpaceRequired(Error):
    msg = "scratch space required and none found"


class BlankImageError(Error):
    prefix = "Unable to create blank image: "
    msg = "{self.reason}"
    reason: str


class RestartRequired(Error):
    msg = "transfer must restart from the beginning: {self.reason}"
    reason: str

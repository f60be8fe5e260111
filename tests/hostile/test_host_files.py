"""Images that name files of the host: refused, and the file is never opened.

A qcow2 can name a backing file and an external data file, a VMDK descriptor
names its extents; qemu-img would open any of them on the importer's host.
Each image here names a FIFO (``conftest.HostFile``) by its absolute path, is
imported over real HTTP by the real worker and uploaded to the real upload
server, with real qemu-img: each must fail with a message saying why, leave
nothing in the volume or scratch space, and never open the FIFO.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.hostile.conftest import HostFile, UploadServer
from tests.importer.conftest import Importer, Volume
from tests.support.httpserver import FileServer

MiB = 1 << 20
SIZE = str(64 * MiB)


def _qemu_img(*argv: str) -> None:
    import subprocess
    subprocess.run(["qemu-img", *argv], check=True, capture_output=True)


def qcow2_with_backing_file(www: Path, host: Path) -> Path:
    image = www / "backing.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(host), "-F", "raw", str(image),
              "1M")
    return image


def qcow2_with_data_file(www: Path, host: Path) -> Path:
    """qemu-img wants the data file to exist when it makes the image, so it is
    made naming a regular file of the same length of name, then renamed."""
    image = www / "datafile.qcow2"
    stand_in = host.with_name("x" * len(host.name))
    stand_in.write_bytes(b"")
    _qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={stand_in},data_file_raw=on",
              str(image), "1M")
    data = image.read_bytes()
    assert data.count(str(stand_in).encode()) == 1
    image.write_bytes(data.replace(str(stand_in).encode(), str(host).encode()))
    return image


def vmdk_descriptor(www: Path, host: Path) -> Path:
    image = www / "descriptor.vmdk"
    image.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW 2048 FLAT "{host}" 0\n\nddb.virtualHWVersion = "4"\n')
    return image


REFUSED: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "qcow2-backing-file": (qcow2_with_backing_file, "has invalid backing file {host}"),
    "qcow2-data-file": (qcow2_with_data_file, "has an external data file {host}"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_image_naming_a_host_file_is_refused(case: str, host_file: HostFile,
                                             http_server: FileServer,
                                             volume: Callable[..., Volume],
                                             import_in_process: Importer) -> None:
    make, reason = REFUSED[case]
    image = make(http_server.root, host_file.path)
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(image.name),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert not host_file.opened, f"the importer opened {host_file.path}"
    assert (result.code, result.message) == (
        1, f"Unable to process data: Image {http_server.url(image.name)} is invalid because it "
           + reason.format(host=host_file.path))
    assert not vol.disk.exists()


@pytest.mark.parametrize("case", list(REFUSED))
def test_upload_naming_a_host_file_is_refused(case: str, host_file: HostFile, tmp_path: Path,
                                              volume: Callable[..., Volume],
                                              upload_server: UploadServer) -> None:
    make, reason = REFUSED[case]
    (tmp_path / "images").mkdir()
    image = make(tmp_path / "images", host_file.path)
    vol = volume()
    url = upload_server(vol)
    with image.open("rb") as body:
        answer = requests.post(f"{url}/v1beta1/upload", data=body, timeout=60)
    assert not host_file.opened, f"the upload server opened {host_file.path}"
    assert (answer.status_code, answer.text) == (
        400, f"Saving stream failed: Image {vol.scratch_dir / 'tmpimage'} is invalid because "
             "it " + reason.format(host=host_file.path))
    assert not vol.disk.exists()
    assert list(vol.scratch_dir.iterdir()) == []


def test_vmdk_descriptor_is_only_text(host_file: HostFile, http_server: FileServer,
                                      volume: Callable[..., Volume],
                                      import_in_process: Importer) -> None:
    """A VMDK descriptor is a text file with no magic: the format detector takes it
    as a raw image of its own bytes, so qemu-img never reads its extents."""
    image = vmdk_descriptor(http_server.root, host_file.path)
    vol = volume()
    result = import_in_process(vol, IMPORTER_ENDPOINT=http_server.url(image.name),
                               IMPORTER_IMAGE_SIZE=SIZE)
    assert not host_file.opened, f"the importer opened {host_file.path}"
    assert result.code == 0, result.message
    text = image.read_bytes()
    with vol.disk.open("rb") as disk:
        assert disk.read(len(text) + 512) == text + bytes(512)


def test_the_host_file_tells_on_a_reader(host_file: HostFile) -> None:
    """The FIFO's watch is what the tests above rely on: it must see an open."""
    assert not host_file.opened
    with host_file.path.open("rb") as f:
        assert f.read() == b""
    deadline = time.monotonic() + 5
    while not host_file.opened:
        assert time.monotonic() < deadline, "a reader went unnoticed"
        time.sleep(0.01)

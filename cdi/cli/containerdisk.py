"""``cdi containerdisk push``: publish a disk image as a containerdisk.

Golden images are shipped as containerdisks (the disk under ``/disk/`` in an
image layer); skopeo or podman are the usual tools, and may not be at hand.
This pushes one (or a multi-architecture index) straight to a registry with
the OCI distribution API, or writes an ``oci-archive`` tarball, using
``importer.containerdisk``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cdi.cli.options import fail
from importer import containerdisk, oci


def _arch_disks(values: tuple[str, ...]) -> dict[str, Path]:
    disks: dict[str, Path] = {}
    for value in values:
        arch, sep, path = value.partition("=")
        if not sep or not arch or not path:
            fail(f"error: --arch takes ARCH=PATH, not {value!r}")
        if not Path(path).is_file():
            fail(f"error: {path} is not a file")
        disks[arch] = Path(path)
    return disks


@click.group("containerdisk")
def containerdisk_group() -> None:
    """Containerdisks: VM disk images in container images."""


@containerdisk_group.command("push")
@click.argument("disk", required=False,
                type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.argument("destination")
@click.option("--arch", "arches", multiple=True, metavar="ARCH=PATH",
              help="A disk per architecture (an image index); instead of DISK.")
@click.option("--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip",
              show_default=True)
@click.option("--media", type=click.Choice(["oci", "docker"]), default="oci", show_default=True)
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Image environment (KUBEVIRT_IO_ names become PVC labels on import).")
@click.option("--name", default=None, help="File name under disk/ (default: the disk's).")
@click.option("--username", default=None)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=None, help="Extra CA certificates (PEM files) for the registry.")
@click.option("--insecure", is_flag=True, help="Plain HTTP, or TLS without verification.")
def push(disk: Path | None, destination: str, arches: tuple[str, ...], compression: str,
         media: str, env: tuple[str, ...], name: str | None, username: str | None,
         password_stdin: bool, cert_dir: Path | None, insecure: bool) -> None:
    """Push DISK (qcow2 or raw) to DESTINATION: [docker://]host/repo[:tag] or
    oci-archive:PATH.  Prints the manifest (or index) digest."""
    if (disk is None) == (not arches):
        fail("error: give DISK or --arch ARCH=PATH (one or more), not both")
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if password is not None and username is None:
        fail("error: --password-stdin needs --username")
    for e in env:
        if "=" not in e:
            fail(f"error: --env takes NAME=VALUE, not {e!r}")
    try:
        digest = containerdisk.publish(
            disk if disk is not None else _arch_disks(arches), destination,
            compression=compression, media=media, env=env, name=name, username=username,
            password=password, cert_dir=cert_dir, insecure=insecure)
    except oci.InvalidReference as e:
        fail(f"error: {e.reason}")
    except oci.RegistryError as e:
        fail(f"error: {e}")
    click.echo(digest)

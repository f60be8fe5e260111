"""The ``cdi`` command.

Until the control plane lands, it offers ``cdi demo``: the quick start's
import of a disk image through the real worker, so a new user sees the data
plane work end to end on one machine.
"""

from __future__ import annotations

import click

from cdi.cli import demo


@click.group()
@click.version_option(package_name="cdi")
def main() -> None:
    """Containerized Data Importer: fill volumes with VM disk images."""


main.add_command(demo.demo)

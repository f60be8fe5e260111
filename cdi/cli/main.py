"""The ``cdi`` command.

``cdi serve`` runs the control plane on this machine; ``cdi demo`` imports a
disk image through the real worker, so a new user sees the data plane work end
to end.  The kubectl-like commands (``apply``, ``create``, ``get``,
``describe``, ``wait``, ``logs``, ``delete``) talk to the REST API of a running
``cdi serve``; ``cdi.cli.config`` says how they find it.

Commands are imported only when they run: ``cdi get`` should not pay for
importing the store, the controllers and the models that ``cdi serve`` needs
(that halves its start-up time, which scripts calling it in a loop feel).
"""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "serve": "cdi.cli.serve:serve_command",
    "controller": "cdi.cli.controller:controller",
    "apiserver": "cdi.cli.apiserver:apiserver",
    "uploadproxy": "cdi.cli.uploadproxy:uploadproxy",
    "demo": "cdi.cli.demo:demo",
    "apply": "cdi.cli.apply:apply",
    "create": "cdi.cli.apply:create",
    "delete": "cdi.cli.apply:delete",
    "get": "cdi.cli.get:get",
    "logs": "cdi.cli.get:logs",
    "describe": "cdi.cli.describe:describe",
    "wait": "cdi.cli.wait:wait",
    "image-upload": "cdi.cli.upload:image_upload",
    "auth": "cdi.cli.auth:auth",
    "containerdisk": "cdi.cli.containerdisk:containerdisk_group",
    "manifests": "cdi.cli.render:manifests",
}


class LazyGroup(click.Group):
    """A group whose commands are ``module:attribute`` names, imported on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@click.version_option(package_name="cdi")
def main() -> None:
    """Containerized Data Importer: fill volumes with VM disk images."""


if __name__ == "__main__":
    main()

"""What every API command shares: where the server is, kind names, failing in one line.

Each command that talks to the API server is wrapped by :func:`api_command`,
which adds the connection options (``--server``, ``--token-file``,
``--data-dir``, ``--certificate-authority`` and their ``CDI_*`` variables),
finds the server (``config.find_server``), opens a :class:`Client` and closes
it, and turns every expected failure into one line on stderr and exit code 1,
as kubectl does: ``Error from server (NotFound): ...`` for a ``Status``,
``error: ...`` for everything found on this side.  No traceback reaches the
user for those; a real bug still shows one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, NoReturn

import click

from cdi.api import kinds
from cdi.api.kinds import Kind
from cdi.cli import config
from cdi.cli.client import Client, ClientError
from cdi.cli.manifests import ManifestError

DEFAULT_NAMESPACE = "default"

_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)")


class CommandError(Exception):
    """A failure found on the client side; the message is printed as is."""


def fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(1)


def kind_named(name: str) -> Kind:
    """The kind for a name, plural or short name, like kubectl's resource types."""
    try:
        return kinds.lookup(name)
    except KeyError:
        raise CommandError(
            f'error: the server doesn\'t have a resource type "{name}"') from None


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``1m30s``, ``500ms``, ``2h`` or a bare number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise CommandError(f'error: invalid duration "{text}" (use e.g. 30s, 5m, 1h)')
    return total


def namespace_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-n", "--namespace", default=None,
                        help="The namespace (default: default).")(func)


def api_command(func: Callable[..., None]) -> Callable[..., None]:
    """Give FUNC a connected ``client`` as first argument and one-line errors."""

    @click.option("--server", envvar="CDI_SERVER", default=None,
                  help="API server URL (default: from --data-dir or the last `cdi serve`).")
    @click.option("--token-file", envvar="CDI_TOKEN_FILE", default=None,
                  help="File holding the API token.")
    @click.option("--data-dir", envvar="CDI_DATA_DIR", default=None,
                  help="Data dir of the `cdi serve` to use (reads its server.json).")
    @click.option("--certificate-authority", envvar="CDI_CA_FILE", default=None,
                  help="CA bundle to verify an https server with.")
    @functools.wraps(func)
    def wrapper(*args: Any, server: str | None, token_file: str | None, data_dir: str | None,
                certificate_authority: str | None, **kwargs: Any) -> None:
        try:
            info = config.find_server(server=server, token_file=token_file,
                                      data_dir=data_dir, ca_file=certificate_authority)
            with Client(info.url, info.token, ca_file=info.ca_file) as client:
                func(client, *args, **kwargs)
        except config.ConfigError as e:
            fail(f"error: {e}")
        except (ClientError, ManifestError, CommandError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            raise SystemExit(130) from None

    return wrapper

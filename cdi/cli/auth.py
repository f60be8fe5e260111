"""``cdi auth``: the API's bearer tokens for users and service accounts.

The admin token (``<data-dir>/api-token``) is ``system:admin`` in
``system:masters`` and may do everything.  These commands, run with it, make
tokens for other identities, whose requests RBAC then checks::

    cdi auth create-token --user alice --group dev > alice.token
    cdi auth create-token --service-account target-ns/default
    cdi auth list-tokens
    cdi auth revoke 3f9a01c2

``create-token`` prints the token on stdout and nothing else (so it can be
redirected to a file); it is shown this once, the server keeps only its
SHA-256 digest.  ``list-tokens`` shows ids and identities, never a token.
The server side is ``/auth/v1/tokens`` (``cdi.apiserver.auth``).
"""

from __future__ import annotations

from typing import Any

import click

from cdi.cli import printers
from cdi.cli.client import Client
from cdi.cli.options import CommandError, api_command

TOKENS = "/auth/v1/tokens"


@click.group("auth")
def auth() -> None:
    """Bearer tokens for users and service accounts (admin only)."""


@auth.command("create-token")
@click.option("--user", "user", default=None, metavar="NAME", help="The user's name.")
@click.option("--group", "groups", multiple=True, metavar="GROUP",
              help="A group of the user (repeatable).")
@click.option("--service-account", default=None, metavar="NAMESPACE/NAME",
              help="A service account: system:serviceaccount:NAMESPACE:NAME.")
@api_command
def create_token(client: Client, user: str | None, groups: tuple[str, ...],
                 service_account: str | None) -> None:
    """Make a token; prints it on stdout (this once)."""
    body: dict[str, Any]
    if (user is None) == (service_account is None):
        raise CommandError("error: give either --user NAME or --service-account NS/NAME")
    if service_account is not None:
        if groups:
            raise CommandError("error: --group goes with --user, not --service-account")
        namespace, slash, name = service_account.partition("/")
        if not (slash and namespace and name):
            raise CommandError(f'error: invalid service account "{service_account}": '
                               "expected NAMESPACE/NAME")
        body = {"serviceAccount": {"namespace": namespace, "name": name}}
    else:
        body = {"user": user, "groups": list(groups)}
    made = client._json("POST", TOKENS, body=body)
    token = made.pop("token", "")
    if not token:
        raise CommandError("error: the server sent no token")
    click.echo(f"token {made.get('id')} for {made.get('user')} "
               f"(groups: {', '.join(made.get('groups') or [])})", err=True)
    click.echo(token)


@auth.command("list-tokens")
@api_command
def list_tokens(client: Client) -> None:
    """List the tokens: ids and identities, never the tokens themselves."""
    items = client._json("GET", TOKENS).get("items") or []
    at = printers.now()
    rows = [[str(t.get("id", "")), str(t.get("kind", "")), str(t.get("user", "")),
             ",".join(t.get("groups") or []), printers.age(t.get("created"), at)]
            for t in items]
    if not rows:
        click.echo("No tokens found.", err=True)
        return
    for line in printers.table(["ID", "KIND", "USER", "GROUPS", "AGE"], rows):
        click.echo(line)


@auth.command("revoke")
@click.argument("token_id", metavar="ID")
@api_command
def revoke(client: Client, token_id: str) -> None:
    """Revoke the token ID (see list-tokens); its requests fail from now on."""
    gone = client._json("DELETE", f"{TOKENS}/{token_id}")
    click.echo(f"token {gone.get('id')} for {gone.get('user')} revoked")

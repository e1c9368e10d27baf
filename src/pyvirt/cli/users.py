"""``pyvirt user ...``: the web GUI's local accounts, managed over the daemon's
API as its administrator (the Unix socket, or ``-c URI``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from pyvirt.errors import UserInputError

__all__ = ["user"]

ROLES = ("admin", "user", "viewer")


def _with_client(ctx: click.Context, fn: Callable[[Any], None]) -> None:
    from pyvirt.cli.main import _guarded
    from pyvirt.cli.virsh import _uri, connect

    def run() -> int:
        client = connect(_uri(ctx))
        try:
            fn(client)
        finally:
            client.close()
        return 0

    sys.exit(_guarded(ctx.find_root(), run))


def _password(stdin: bool) -> str:
    """The new password: stdin's first line, or asked twice on the terminal."""
    if stdin:
        line = sys.stdin.readline(4096)
        pw = line.removesuffix("\n").removesuffix("\r")
        if not pw:
            raise UserInputError("no password on standard input")
        return pw
    import getpass

    try:
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Again: ")
    except EOFError:
        raise UserInputError("no password given (use --password-stdin without a "
                             "terminal)") from None
    if first != second:
        raise UserInputError("the passwords differ")
    return first


def _check(pw: str) -> str:
    from pyvirt.manager.auth import PASSWORD_MAX, PASSWORD_MIN

    if not PASSWORD_MIN <= len(pw) <= PASSWORD_MAX:
        raise UserInputError(f"password: {PASSWORD_MIN} to {PASSWORD_MAX} characters")
    return pw


@click.group()
def user() -> None:
    """Accounts of the web GUI (pyvirt daemon --web)."""


@user.command("list")
@click.pass_context
def user_list(ctx: click.Context) -> None:
    """List the accounts, their roles and the domains granted to them."""

    def run(c: Any) -> None:
        rows = c.user_list()
        click.echo(f"{'Name':<20} {'Role':<8} Domains")
        click.echo("-" * 50)
        for u in rows:
            grants = ", ".join(u["grants"]) if u["role"] != "admin" else "(all)"
            click.echo(f"{u['name']:<20} {u['role']:<8} {grants}")

    _with_client(ctx, run)


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True,
              help="admin: everything; user: the domains granted to them (and those they "
                   "create); viewer: granted domains, read-only.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@click.pass_context
def user_add(ctx: click.Context, name: str, role: str, password_stdin: bool) -> None:
    """Create the account NAME."""

    def run(c: Any) -> None:
        c.user_add(name, _check(_password(password_stdin)), role=role)
        click.echo(f"User {name} created ({role})")

    _with_client(ctx, run)


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@click.option("--role", type=click.Choice(ROLES), help="Also change the role.")
@click.pass_context
def user_passwd(ctx: click.Context, name: str, password_stdin: bool, role: str | None) -> None:
    """Set NAME's password (their web sessions end)."""

    def run(c: Any) -> None:
        c.user_set(name, password=_check(_password(password_stdin)), role=role)
        click.echo(f"Password of {name} changed")

    _with_client(ctx, run)


@user.command("del")
@click.argument("name")
@click.pass_context
def user_del(ctx: click.Context, name: str) -> None:
    """Delete the account NAME (its sessions end)."""

    def run(c: Any) -> None:
        c.user_delete(name)
        click.echo(f"User {name} deleted")

    _with_client(ctx, run)


@user.command("grant")
@click.argument("name")
@click.argument("domain")
@click.pass_context
def user_grant(ctx: click.Context, name: str, domain: str) -> None:
    """Let NAME see and use DOMAIN."""

    def run(c: Any) -> None:
        c.user_grant(name, domain)
        click.echo(f"Domain {domain} granted to {name}")

    _with_client(ctx, run)


@user.command("revoke")
@click.argument("name")
@click.argument("domain")
@click.pass_context
def user_revoke(ctx: click.Context, name: str, domain: str) -> None:
    """Take DOMAIN away from NAME."""

    def run(c: Any) -> None:
        c.user_revoke(name, domain)
        click.echo(f"Domain {domain} revoked from {name}")

    _with_client(ctx, run)

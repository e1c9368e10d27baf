"""virsh's verbs against pyvirtd, and ``pyvirt create`` (virt-install's).

Every verb talks to the daemon only through :class:`pyvirt.client.Client`
(``-c URI`` or ``$PYVIRT_URI``). Output follows virsh: tables laid out as
``vsh-table.c`` lays them out, ``Label:  value`` blocks for the info verbs, a
blank line after each command's output, and ``error: MESSAGE`` on stderr with
exit status 1 for every failure. ``--json`` on listing and info verbs prints
the API's own JSON for scripts.

Start-up matters (``pyvirt list`` is run in loops): this module imports only
click at load time; the client, YAML, rich and termios come when a verb needs
them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from pyvirt.cli.tables import INACTIVE as _INACTIVE
from pyvirt.cli.tables import format_list, table
from pyvirt.cli.tables import one_line as _one_line
from pyvirt.errors import PyvirtError

__all__ = ["VERBS", "CliError", "connect"]

#: verb name -> attribute of this module holding its click command (cli/main.py
#: registers each one lazily)
VERBS: dict[str, str] = {
    "list": "list_", "define": "define", "undefine": "undefine", "start": "start",
    "shutdown": "shutdown", "destroy": "destroy", "reboot": "reboot", "reset": "reset",
    "suspend": "suspend", "resume": "resume", "console": "console", "dominfo": "dominfo",
    "domstate": "domstate", "domstats": "domstats", "domblklist": "domblklist",
    "domiflist": "domiflist", "dumpdef": "dumpdef", "edit": "edit",
    "snapshot-create-as": "snapshot_create_as", "snapshot-list": "snapshot_list",
    "snapshot-revert": "snapshot_revert", "snapshot-delete": "snapshot_delete",
    "snapshot-current": "snapshot_current", "save": "save", "restore": "restore",
    "managedsave": "managedsave", "managedsave-remove": "managedsave_remove",
    "autostart": "autostart",
    "pool-list": "pool_list", "pool-define-as": "pool_define_as", "pool-start": "pool_start",
    "pool-destroy": "pool_destroy", "pool-undefine": "pool_undefine",
    "pool-refresh": "pool_refresh", "pool-info": "pool_info", "pool-autostart": "pool_autostart",
    "vol-list": "vol_list", "vol-create-as": "vol_create_as", "vol-clone": "vol_clone",
    "vol-delete": "vol_delete", "vol-resize": "vol_resize", "vol-info": "vol_info",
    "vol-path": "vol_path", "vol-upload": "vol_upload", "vol-import": "vol_import",
    "net-list": "net_list", "net-define": "net_define", "net-start": "net_start",
    "net-destroy": "net_destroy", "net-undefine": "net_undefine", "net-info": "net_info",
    "net-autostart": "net_autostart", "net-dhcp-leases": "net_dhcp_leases",
    "event": "event", "create": "create",
    "clone": "clone", "attach-disk": "attach_disk", "detach-disk": "detach_disk",
    "blockresize": "blockresize", "attach-interface": "attach_interface",
    "detach-interface": "detach_interface",
}

#: the most a definition file may hold (a definition is a few KiB)
MAX_FILE = 1 << 20

#: virsh's escape key for the console: Ctrl-]
ESCAPE = 0x1D



class CliError(PyvirtError):
    """A problem found by the CLI itself (an unreadable file, a bad option value)."""


def connect(uri: str | None) -> Any:
    """The client for ``uri`` (tests replace this function with a fake's factory)."""
    from pyvirt.client import Client

    return Client(uri)


# ----------------------------------------------------------------- plumbing

def _uri(ctx: click.Context) -> str | None:
    root = ctx.find_root()
    # shell completion parses without running the group's callback: its params then
    uri = root.obj.get("uri") if isinstance(root.obj, dict) else root.params.get("uri")
    return uri if isinstance(uri, str) and uri else None


def _debug(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(obj.get("debug")) if isinstance(obj, dict) else False


def _run(ctx: click.Context, fn: Callable[[Any], None], *, blank: bool = True) -> None:
    """Connect, run ``fn(client)``, and end as virsh does: a blank line after the
    output, or ``error: MESSAGE`` on stderr and exit status 1."""
    client: Any = None
    try:
        client = connect(_uri(ctx))
        fn(client)
    except PyvirtError as exc:
        if _debug(ctx):
            raise
        msg = getattr(exc, "message", None) or str(exc)
        click.echo(f"error: {_one_line(str(msg))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        close = getattr(client, "close", None)
        if callable(close):
            close()
    if blank:
        click.echo("")


def _echo_json(obj: object) -> None:
    import json  # here, not at the top: start-up cost

    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _echo_json_line(obj: object) -> None:
    import json

    click.echo(json.dumps(obj, default=str))


def _info(pairs: Sequence[tuple[str, object]]) -> None:
    """``Label:`` padded to 15 columns, as virsh's dominfo/pool-info/vol-info."""
    for label, value in pairs:
        click.echo(f"{label + ':':<15} {_one_line(str(value))}")


def pretty_capacity(value: int | float | None) -> str:
    """virsh's ``vshPrettyCapacity``: two decimals in the largest binary unit."""
    if value is None:
        return "-"
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if v < 1024 or unit == "PiB":
            return f"{v:.2f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


_SCALE = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40, "p": 1 << 50,
          "pib": 1 << 50, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}


def parse_scaled(text: str, what: str, default_unit: str = "") -> int:
    """virsh's scaled integers: ``10G``, ``512MiB``, ``1GB`` (decimal); a bare
    number is in ``default_unit`` (bytes for virsh)."""
    s = text.strip()
    digits = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(digits):].strip().lower() or default_unit
    if not digits.isdigit() or unit not in _SCALE:
        raise CliError(f"{what}: invalid size '{_one_line(text)}' "
                       "(a number with an optional unit: K, M, G, T)")
    return int(digits) * _SCALE[unit]


def _time(t: object, fmt: str = "%Y-%m-%d %H:%M:%S %z") -> str:
    import time

    if not isinstance(t, int | float):
        return "-"
    return time.strftime(fmt, time.localtime(t))


def _yes(v: object) -> str:
    return "yes" if v else "no"


def _wait(c: Any, task_id: object, what: str) -> dict[str, Any]:
    """Follow a task to its end, with a progress bar on a terminal; a failed task
    is an error with the task's message."""
    bar: Any = None
    handle: Any = None
    on_progress: Callable[[dict[str, Any]], None] | None = None
    if sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.progress import Progress
        except ImportError:  # rich missing: no bar, same result
            Progress = None  # type: ignore[assignment,misc]
        if Progress is not None:
            # on stderr: stdout stays the command's output (--json, vol-path, ...)
            bar = Progress(console=Console(file=sys.stderr), transient=True)
            handle = bar.add_task(what, total=1.0)

            def on_progress(task: dict[str, Any]) -> None:
                bar.update(handle, completed=float(task.get("progress") or 0.0),
                           description=str(task.get("message") or what))
    if bar is not None:
        bar.start()
    try:
        result: dict[str, Any] = c.wait_task(task_id, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.stop()
    if result.get("state") == "failed":
        raise CliError(str(result.get("error") or f"{what} failed"))
    return result


def _method(c: Any, name: str, what: str) -> Callable[..., Any]:
    """The client's method ``name``; a daemon (client) without it says so in one line."""
    fn = getattr(c, name, None)
    if not callable(fn):
        raise CliError(f"{what} is not supported by this version of pyvirt's client")
    return fn  # type: ignore[no-any-return]


def _task_id(answer: object) -> object:
    """A long operation answers a task id (or ``{"task": id}``)."""
    if isinstance(answer, dict) and "task" in answer:
        return answer["task"]
    return answer


def _yaml_why(exc: Exception) -> str:
    """PyYAML's error as one line: where and what (``line 1, column 12: expected ','
    or ']', but got '<stream end>'``), without the excerpt it draws."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def _read_document(path: str) -> dict[str, Any]:
    """A JSON or YAML document from ``path`` (``-`` is stdin), as a mapping."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_FILE + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise CliError(f"{path}: larger than {MAX_FILE} bytes: not a definition")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None
    doc: object
    if path.endswith((".yaml", ".yml")) or not text.lstrip().startswith(("{", "[")):
        import yaml  # type: ignore[import-untyped, unused-ignore]

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CliError(f"{path}: not valid YAML: {_yaml_why(exc)}") from None
    else:
        import json

        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise CliError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{path}: the document must be a mapping of keys to values")
    return doc


def _complete_domains(ctx: click.Context, param: click.Parameter,
                      incomplete: str) -> list[Any]:
    """Domain names for shell completion, asked of the daemon (nothing if it is away)."""
    try:
        c = connect(_uri(ctx))
        names = [d["name"] for d in c.list_domains(all=True)]
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [n for n in names if n.startswith(incomplete)]


def _complete_pools(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    try:
        names = [p["name"] for p in connect(_uri(ctx)).pool_list()]
    except Exception:
        return []
    return [n for n in names if n.startswith(incomplete)]


def _complete_networks(ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[Any]:
    try:
        names = [n["name"] for n in connect(_uri(ctx)).net_list()]
    except Exception:
        return []
    return [n for n in names if n.startswith(incomplete)]


def _domain_arg(name: str = "domain") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument(name, metavar="DOMAIN", shell_complete=_complete_domains)


def _pool_arg(name: str = "pool") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument(name, metavar="POOL", shell_complete=_complete_pools)


def _net_arg(name: str = "network") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument(name, metavar="NETWORK", shell_complete=_complete_networks)


_json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_pool_opt = click.option("--pool", default="default", show_default=True,
                         shell_complete=_complete_pools, help="The volume's storage pool.")


# ------------------------------------------------------------------ domains

@click.command("list")
@click.option("--all", "all_", is_flag=True, help="Active and inactive domains.")
@click.option("--inactive", is_flag=True, help="Only inactive (shut off) domains.")
@click.option("--name", "names", is_flag=True, help="Only the names, one a line.")
@click.option("--uuid", "uuids", is_flag=True, help="Only the UUIDs, one a line.")
@_json_opt
@click.pass_context
def list_(ctx: click.Context, all_: bool, inactive: bool, names: bool, uuids: bool,
          as_json: bool) -> None:
    """List domains (the running ones unless --all or --inactive)."""

    def go(c: Any) -> None:
        out = format_list(c.list_domains(all=all_ or inactive), all_=all_, inactive=inactive,
                          names=names, uuids=uuids, as_json=as_json)
        if out or as_json:
            click.echo(out)

    _run(ctx, go, blank=not as_json)


@click.command()
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def define(ctx: click.Context, file: str) -> None:
    """Define (or redefine) a domain from a JSON or YAML definition."""

    def go(c: Any) -> None:
        doc = _read_document(file)
        dom = c.define(doc)
        click.echo(f"Domain '{_one_line(str(dom.get('name', doc.get('name'))))}' "
                   f"defined from {file}")

    _run(ctx, go)


@click.command()
@_domain_arg()
@click.option("--remove-all-storage", is_flag=True,
              help="Also delete the pool volumes the domain uses.")
@click.option("--snapshots-metadata", is_flag=True,
              help="Remove the domain's snapshots too (what pyvirt always does; "
                   "accepted for virsh's scripts).")
@click.option("--managed-save", is_flag=True,
              help="Remove a managed save image too (always done; accepted for virsh's scripts).")
@click.pass_context
def undefine(ctx: click.Context, domain: str, remove_all_storage: bool,
             snapshots_metadata: bool, managed_save: bool) -> None:
    """Remove a shut-off domain's definition."""

    def go(c: Any) -> None:
        c.undefine(domain, remove_storage=remove_all_storage)
        click.echo(f"Domain '{domain}' has been undefined")

    _run(ctx, go)


@click.command()
@_domain_arg()
@click.option("--console", "attach", is_flag=True, help="Attach to the console after starting.")
@click.option("--paused", is_flag=True, help="Leave the domain paused.")
@click.pass_context
def start(ctx: click.Context, domain: str, attach: bool, paused: bool) -> None:
    """Start a defined domain (from its managed save if it has one)."""

    def go(c: Any) -> None:
        if attach:
            _need_tty()
        c.start(domain, paused=paused)
        click.echo(f"Domain '{domain}' started")
        if attach:
            _console(c, domain)

    _run(ctx, go)


@click.command()
@_domain_arg()
@click.option("--timeout", type=click.FloatRange(min=0.1, max=3600), default=60.0,
              show_default=True, metavar="SECONDS",
              help="How long to wait for the guest to power off.")
@click.pass_context
def shutdown(ctx: click.Context, domain: str, timeout: float) -> None:
    """Ask the guest to power off (ACPI power button) and wait for it."""

    def go(c: Any) -> None:
        c.shutdown(domain, timeout=timeout)
        click.echo(f"Domain '{domain}' is being shutdown")

    _run(ctx, go)


def _simple(verb: str, method: str, done: str, help_: str) -> click.Command:
    @click.command(verb, help=help_)
    @_domain_arg()
    @click.pass_context
    def cmd(ctx: click.Context, domain: str) -> None:
        def go(c: Any) -> None:
            getattr(c, method)(domain)
            click.echo(done.format(domain))

        _run(ctx, go)

    return cmd


destroy = _simple("destroy", "destroy", "Domain '{}' destroyed",
                  "Stop a domain at once (its VMM is ended).")
reboot = _simple("reboot", "reboot", "Domain '{}' is being rebooted",
                 "Ask the guest to reboot (Ctrl-Alt-Del).")
reset = _simple("reset", "reset", "Domain '{}' was reset", "Reset the domain like a reset button.")
suspend = _simple("suspend", "suspend", "Domain '{}' suspended", "Pause a running domain.")
resume = _simple("resume", "resume", "Domain '{}' resumed", "Resume a paused domain.")


def _need_tty() -> None:
    if not sys.stdin.isatty():
        raise CliError("Cannot run interactive console without a controlling TTY")


def _console(c: Any, domain: str) -> None:
    """Relay this terminal (raw mode) and the domain's serial console until
    Ctrl-] or the console closes (the domain stopped)."""
    import select
    import termios
    import threading
    import tty

    ws = c.console(domain)
    click.echo(f"Connected to domain '{domain}'\nEscape character is ^] (Ctrl + ])")
    fd = sys.stdin.fileno()
    out = sys.stdout.fileno()
    ended = threading.Event()

    def pump() -> None:  # console output -> terminal
        try:
            while True:
                data = ws.recv()
                os.write(out, data.encode() if isinstance(data, str) else data)
        except Exception:  # closed by the daemon (domain stopped) or by us
            ended.set()

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    reader = threading.Thread(target=pump, name="console-out", daemon=True)
    reader.start()
    try:
        while not ended.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 4096)
            if not data:
                break
            cut = data.find(ESCAPE)
            if cut >= 0:
                if cut:
                    ws.send(data[:cut])
                break
            ws.send(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        with contextlib.suppress(Exception):
            ws.close()
        reader.join(2)
    click.echo("")


@click.command()
@_domain_arg()
@click.option("--force", is_flag=True,
              help="Take over the console from another session (always done: one "
                   "session at a time, the newest wins).")
@click.option("--safe", is_flag=True, hidden=True)
@click.pass_context
def console(ctx: click.Context, domain: str, force: bool, safe: bool) -> None:
    """Attach the terminal to the domain's serial console (Ctrl-] leaves)."""

    def go(c: Any) -> None:
        _need_tty()
        _console(c, domain)

    _run(ctx, go, blank=False)


def _bytes(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return parse_scaled(v, "memory", "mib")
        except CliError:
            return None
    return None


@click.command()
@_domain_arg()
@_json_opt
@click.pass_context
def dominfo(ctx: click.Context, domain: str, as_json: bool) -> None:
    """Basic information about a domain."""

    def go(c: Any) -> None:
        d = c.domain(domain)
        if as_json:
            _echo_json(d)
            return
        running = d.get("state") not in _INACTIVE
        mem = _bytes(d.get("memory"))
        if mem is None:
            mem = _bytes((d.get("definition") or {}).get("memory"))
        cpu_time: str | None = None
        if running:
            try:
                cpu_time = f"{float(c.stats(domain).get('cpu_time_s') or 0.0):.1f}s"
            except PyvirtError:  # it stopped meanwhile: leave the line out, as virsh does
                cpu_time = None
        kib = "-" if mem is None else f"{mem // 1024} KiB"
        rows: list[tuple[str, object]] = [
            ("Id", "-" if d.get("id") is None else d["id"]), ("Name", d.get("name")),
            ("UUID", d.get("uuid")), ("OS Type", "hvm"), ("State", d.get("state")),
            ("CPU(s)", d.get("cpus") or (d.get("definition") or {}).get("cpus", 1))]
        if cpu_time is not None:
            rows.append(("CPU time", cpu_time))
        rows += [("Max memory", kib), ("Used memory", kib), ("Persistent", "yes"),
                 ("Autostart", "enable" if d.get("autostart") else "disable"),
                 ("Managed save", _yes(d.get("managed_save"))),
                 ("Security model", "none"), ("Security DOI", "0")]
        if d.get("security_label"):  # virsh's DAC lines: the VMM's user and group
            rows += [("Security model", "dac"), ("Security DOI", "0"),
                     ("Security label", f"{d['security_label']} (enforcing)")]
        _info(rows)

    _run(ctx, go, blank=not as_json)


@click.command()
@_domain_arg()
@click.option("--reason", is_flag=True, help="Also say why it is in that state.")
@_json_opt
@click.pass_context
def domstate(ctx: click.Context, domain: str, reason: bool, as_json: bool) -> None:
    """The domain's state (running, paused, in shutdown, shut off, crashed)."""

    def go(c: Any) -> None:
        d = c.domain(domain)
        if as_json:
            _echo_json({"state": d.get("state"), "reason": d.get("reason"),
                        "detail": d.get("detail", "")})
        elif reason:
            click.echo(f"{d.get('state')} ({d.get('reason')})")
        else:
            click.echo(str(d.get("state")))

    _run(ctx, go, blank=not as_json)


#: libvirt's virDomainState numbers, as domstats prints them
_STATE_NUM = {"running": 1, "paused": 3, "in shutdown": 4, "shut off": 5, "crashed": 6}


def _flat(prefix: str, item: dict[str, Any]) -> list[str]:
    lines = []
    for k, v in item.items():
        if isinstance(v, dict | list):
            continue
        key = "name" if k == "name" else str(k).replace("_", ".")
        lines.append(f"  {prefix}.{key}={v}")
    return lines


@click.command()
@click.argument("domains", nargs=-1, metavar="[DOMAIN]...", shell_complete=_complete_domains)
@_json_opt
@click.pass_context
def domstats(ctx: click.Context, domains: tuple[str, ...], as_json: bool) -> None:
    """Statistics of running domains (all of them when none is named)."""

    def go(c: Any) -> None:
        names = list(domains) or [d["name"] for d in c.list_domains(all=False)
                                  if d.get("state") not in _INACTIVE]
        every = {n: c.stats(n) for n in names}
        if as_json:
            _echo_json(every)
            return
        for n, s in every.items():
            click.echo(f"Domain: '{n}'")
            click.echo(f"  state.state={_STATE_NUM.get(str(s.get('state')), 0)}")
            if s.get("cpu_time_s") is not None:
                click.echo(f"  cpu.time={int(float(s['cpu_time_s']) * 1e9)}")
            if s.get("uptime_s") is not None:
                click.echo(f"  uptime={float(s['uptime_s']):.1f}")
            if s.get("boot_count") is not None:
                click.echo(f"  boot.count={s['boot_count']}")
            mem = _bytes(s.get("memory"))
            if mem is not None:
                click.echo(f"  balloon.current={mem // 1024}\n  balloon.maximum={mem // 1024}")
            if s.get("vcpus") is not None:
                click.echo(f"  vcpu.current={s['vcpus']}\n  vcpu.maximum={s['vcpus']}")
            for kind, key in (("net", "nics"), ("block", "disks")):
                items = [x for x in s.get(key) or [] if isinstance(x, dict)]
                click.echo(f"  {kind}.count={len(items)}")
                for i, item in enumerate(items):
                    for line in _flat(f"{kind}.{i}", item):
                        click.echo(line)
            click.echo("")

    _run(ctx, go, blank=False)


@click.command()
@_domain_arg()
@click.option("--details", is_flag=True, help="Also the type and device columns.")
@_json_opt
@click.pass_context
def domblklist(ctx: click.Context, domain: str, details: bool, as_json: bool) -> None:
    """The domain's disks."""

    def go(c: Any) -> None:
        disks = c.block_list(domain)
        if as_json:
            _echo_json(disks)
        elif details:
            click.echo(table(("Type", "Device", "Target", "Source"),
                             [("file", "disk", d.get("target"), d.get("source") or "-")
                              for d in disks]))
        else:
            click.echo(table(("Target", "Source"),
                             [(d.get("target"), d.get("source") or "-") for d in disks]))

    _run(ctx, go, blank=not as_json)


@click.command()
@_domain_arg()
@_json_opt
@click.pass_context
def domiflist(ctx: click.Context, domain: str, as_json: bool) -> None:
    """The domain's network interfaces."""

    def go(c: Any) -> None:
        nics = c.iface_list(domain)
        if as_json:
            _echo_json(nics)
        else:
            click.echo(table(("Interface", "Type", "Source", "Model", "MAC"),
                             [(n.get("interface") or "-", n.get("type"), n.get("source") or "-",
                               n.get("model") or "virtio", n.get("mac") or "-") for n in nics]))

    _run(ctx, go, blank=not as_json)


def _dump(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps(doc, indent=2) + "\n"
    import yaml  # type: ignore[import-untyped, unused-ignore]

    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


@click.command()
@_domain_arg()
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml",
              show_default=True, help="The document's format (define reads both).")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.pass_context
def dumpdef(ctx: click.Context, domain: str, fmt: str, as_json: bool) -> None:
    """Print the domain's definition (virsh's dumpxml): define takes it back."""

    def go(c: Any) -> None:
        click.echo(_dump(c.domain(domain).get("definition") or {},
                         "json" if as_json else fmt), nl=False)

    _run(ctx, go, blank=False)


def _ask_again() -> bool:
    """virsh's question after a failed edit (y and n of its y,n,i,f,?)."""
    while True:
        click.echo("Failed. Try again? [y,n,i,f,?]: ", nl=False)
        answer = sys.stdin.readline()
        if not answer:
            click.echo("")
            return False
        answer = answer.strip().lower()
        if answer == "y":
            return True
        if answer == "n":
            return False
        click.echo("y - yes, start editor again\n"
                   "n - no, throw away my changes\n"
                   "? - print this help")


@click.command()
@_domain_arg()
@click.pass_context
def edit(ctx: click.Context, domain: str) -> None:
    """Edit the definition in $EDITOR (default vi); it is checked by the daemon
    before it is stored, and takes effect at the next start."""

    def go(c: Any) -> None:
        import shlex
        import shutil
        import subprocess
        import tempfile

        original = c.domain(domain).get("definition") or {}
        text = _dump(original, "yaml")
        tmpdir = tempfile.mkdtemp(prefix="pyvirt-edit-")
        path = os.path.join(tmpdir, f"{domain}.yaml")
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            editor = shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")
            while True:
                try:
                    status = subprocess.call([*editor, path])
                except OSError as exc:
                    raise CliError(f"cannot run the editor {editor[0]}: "
                                   f"{exc.strerror or exc}") from None
                if status != 0:
                    raise CliError(f"the editor {editor[0]} exited with status {status}")
                with open(path, encoding="utf-8") as f:
                    edited = f.read()
                if edited == text:
                    click.echo(f"Domain '{domain}' definition not changed.")
                    return
                try:
                    c.define(_read_document(path))
                except PyvirtError as exc:
                    msg = getattr(exc, "message", None) or str(exc)
                    click.echo(f"error: {_one_line(str(msg))}", err=True)
                    if not _ask_again():
                        raise CliError("the definition was not changed") from None
                    continue
                click.echo(f"Domain '{domain}' definition edited.")
                return
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    _run(ctx, go)


# ---------------------------------------------------------------- snapshots

@click.command("snapshot-create-as")
@_domain_arg()
@click.argument("name", required=False)
@click.argument("description", required=False)
@click.option("--name", "name_opt", metavar="NAME", help="The snapshot's name (default: the time).")
@click.option("--description", "desc_opt", metavar="TEXT", help="A description.")
@click.option("--disk-only", is_flag=True,
              help="Only the disks (the domain must be shut off; a running domain's "
                   "snapshot always holds its memory too).")
@click.pass_context
def snapshot_create_as(ctx: click.Context, domain: str, name: str | None,
                       description: str | None, name_opt: str | None, desc_opt: str | None,
                       disk_only: bool) -> None:
    """Take a snapshot: memory and disks of a running domain, disks of a shut-off one."""

    def go(c: Any) -> None:
        snap = name_opt or name
        desc = desc_opt or description or ""
        if disk_only and c.domain(domain).get("state") not in _INACTIVE:
            raise CliError("disk-only snapshots of a running domain are not supported: "
                           "shut it off first, or leave out --disk-only")
        task = _wait(c, _task_id(c.snapshot_create(domain, snap, description=desc)),
                     f"snapshot of {domain}")
        res = task.get("result") or {}
        made = snap or (res.get("name") if isinstance(res, dict) else None) or ""
        click.echo(f"Domain snapshot {made} created")

    _run(ctx, go)


def _tree(snaps: list[dict[str, Any]]) -> list[str]:
    """virsh's ``vshTreePrint``: roots flush left, children under ``+- ``."""
    names = [s["name"] for s in snaps]
    parent = {s["name"]: (s.get("parent") if s.get("parent") in names else None) for s in snaps}
    lines: list[str] = []

    def walk(dev: str, last: bool, root: bool, indent: str) -> None:
        lines.append(indent + ("" if root else "+- ") + dev)
        if not root:
            indent += (" " if last else "|") + " "
        kids = [n for n in names if parent[n] == dev]
        if kids:
            lines.append(indent + "  |")
        for i, k in enumerate(kids):
            walk(k, i == len(kids) - 1, False, indent + "  ")
        if not kids and last:
            lines.append(indent.rstrip())

    for n in names:
        if parent[n] is None:
            walk(n, True, True, "")
    return lines


@click.command("snapshot-list")
@_domain_arg()
@click.option("--tree", is_flag=True, help="Show the snapshots as a tree of parents.")
@click.option("--parent", is_flag=True, help="Add a column with each snapshot's parent.")
@_json_opt
@click.pass_context
def snapshot_list(ctx: click.Context, domain: str, tree: bool, parent: bool,
                  as_json: bool) -> None:
    """List the domain's snapshots."""

    def go(c: Any) -> None:
        snaps = sorted(c.snapshot_list(domain), key=lambda s: (s.get("created") or 0))
        if as_json:
            _echo_json(snaps)
        elif tree:
            for line in _tree(snaps):
                click.echo(line)
        else:
            head = ["Name", "Creation Time", "State"] + (["Parent"] if parent else [])
            click.echo(table(head, [[s.get("name"), _time(s.get("created")), s.get("state")]
                                    + ([s.get("parent") or ""] if parent else [])
                                    for s in snaps]))

    _run(ctx, go, blank=not as_json)


def _snap_name(c: Any, domain: str, snap: str | None, current: bool) -> str:
    if snap:
        return snap
    if not current:
        raise CliError("a snapshot name or --current is required")
    for s in c.snapshot_list(domain):
        if s.get("current"):
            return str(s["name"])
    raise CliError(f"domain '{domain}' has no current snapshot")


@click.command("snapshot-revert")
@_domain_arg()
@click.argument("snapshot", required=False)
@click.option("--current", is_flag=True, help="Revert to the current snapshot.")
@click.pass_context
def snapshot_revert(ctx: click.Context, domain: str, snapshot: str | None,
                    current: bool) -> None:
    """Put the domain back to a snapshot (running if the snapshot was)."""

    def go(c: Any) -> None:
        c.snapshot_revert(domain, _snap_name(c, domain, snapshot, current))

    _run(ctx, go)


@click.command("snapshot-delete")
@_domain_arg()
@click.argument("snapshot", required=False)
@click.option("--current", is_flag=True, help="Delete the current snapshot.")
@click.pass_context
def snapshot_delete(ctx: click.Context, domain: str, snapshot: str | None,
                    current: bool) -> None:
    """Delete a snapshot (its children keep their disks)."""

    def go(c: Any) -> None:
        snap = _snap_name(c, domain, snapshot, current)
        c.snapshot_delete(domain, snap)
        click.echo(f"Domain snapshot {snap} deleted")

    _run(ctx, go)


@click.command("snapshot-current")
@_domain_arg()
@click.option("--name", "name_only", is_flag=True, help="Only the snapshot's name.")
@_json_opt
@click.pass_context
def snapshot_current(ctx: click.Context, domain: str, name_only: bool, as_json: bool) -> None:
    """The current snapshot (the one the domain last was at)."""

    def go(c: Any) -> None:
        snaps = c.snapshot_list(domain)
        cur = next((s for s in snaps if s.get("current")), None)
        if cur is None:
            raise CliError(f"domain '{domain}' has no current snapshot")
        if as_json:
            _echo_json(cur)
        elif name_only:
            click.echo(str(cur["name"]))
        else:
            kids = [s for s in snaps if s.get("parent") == cur["name"]]
            _info([("Name", cur["name"]), ("Domain", domain), ("Current", "yes"),
                   ("State", cur.get("state")), ("Location", "internal" if cur.get("memory")
                                                  else "external"),
                   ("Parent", cur.get("parent") or "-"), ("Children", len(kids)),
                   ("Created", _time(cur.get("created"))),
                   ("Description", cur.get("description") or "")])

    _run(ctx, go, blank=not as_json)


# ---------------------------------------------------- save, restore, autostart

@click.command()
@_domain_arg()
@click.argument("file", metavar="FILE")
@click.pass_context
def save(ctx: click.Context, domain: str, file: str) -> None:
    """Save a running domain's state to FILE (a directory) and stop it."""

    def go(c: Any) -> None:
        path = os.path.abspath(file)
        _wait(c, _task_id(c.save(domain, path)), f"saving {domain}")
        click.echo(f"\nDomain '{domain}' saved to {file}")

    _run(ctx, go)


@click.command()
@click.argument("file", metavar="FILE")
@click.pass_context
def restore(ctx: click.Context, file: str) -> None:
    """Start a domain from a state saved with ``save``."""

    def go(c: Any) -> None:
        c.restore(os.path.abspath(file))
        click.echo(f"Domain restored from {file}")

    _run(ctx, go)


@click.command()
@_domain_arg()
@click.pass_context
def managedsave(ctx: click.Context, domain: str) -> None:
    """Save a running domain's state where the daemon keeps it; the next start resumes it."""

    def go(c: Any) -> None:
        _wait(c, _task_id(c.save(domain, None)), f"saving {domain}")
        click.echo(f"\nDomain '{domain}' state saved by pyvirt")

    _run(ctx, go)


@click.command("managedsave-remove")
@_domain_arg()
@click.pass_context
def managedsave_remove(ctx: click.Context, domain: str) -> None:
    """Throw away a domain's managed save: the next start boots afresh."""

    def go(c: Any) -> None:
        if not c.domain(domain).get("managed_save"):
            click.echo(f"Domain '{domain}' has no manage save image; removal skipped")
            return
        _method(c, "managedsave_remove", "removing a managed save")(domain)
        click.echo(f"Removed managedsave image for domain '{domain}'")

    _run(ctx, go)


@click.command()
@_domain_arg()
@click.option("--disable", is_flag=True, help="Do not start it with the daemon.")
@click.pass_context
def autostart(ctx: click.Context, domain: str, disable: bool) -> None:
    """Start the domain when the daemon starts."""

    def go(c: Any) -> None:
        c.set_autostart(domain, not disable)
        click.echo(f"Domain '{domain}' {'unmarked' if disable else 'marked'} as autostarted")

    _run(ctx, go)


# -------------------------------------------------------------------- pools

@click.command("pool-list")
@click.option("--all", "all_", is_flag=True, help="Active and inactive pools.")
@click.option("--inactive", is_flag=True, help="Only inactive pools.")
@click.option("--details", is_flag=True, help="Also capacity, allocation, available.")
@_json_opt
@click.pass_context
def pool_list(ctx: click.Context, all_: bool, inactive: bool, details: bool,
              as_json: bool) -> None:
    """List storage pools (the active ones unless --all or --inactive)."""

    def go(c: Any) -> None:
        pools = sorted(c.pool_list(), key=lambda p: p.get("name", ""))
        if inactive and not all_:
            pools = [p for p in pools if p.get("state") != "active"]
        elif not all_:
            pools = [p for p in pools if p.get("state") == "active"]
        if as_json:
            _echo_json(pools)
        elif details:
            click.echo(table(
                ("Name", "State", "Autostart", "Persistent", "Capacity", "Allocation",
                 "Available"),
                [(p.get("name"), "running" if p.get("state") == "active" else "inactive",
                  _yes(p.get("autostart")), "yes", pretty_capacity(p.get("capacity")),
                  pretty_capacity(p.get("allocation")), pretty_capacity(p.get("available")))
                 for p in pools]))
        else:
            click.echo(table(("Name", "State", "Autostart"),
                             [(p.get("name"), p.get("state"), _yes(p.get("autostart")))
                              for p in pools]))

    _run(ctx, go, blank=not as_json)


@click.command("pool-define-as")
@click.argument("name")
@click.argument("kind", metavar="TYPE", type=click.Choice(["dir"]))
@click.option("--target", required=True, metavar="PATH", help="The pool's directory.")
@click.pass_context
def pool_define_as(ctx: click.Context, name: str, kind: str, target: str) -> None:
    """Define a directory pool."""

    def go(c: Any) -> None:
        c.pool_define({"name": name, "type": kind, "path": os.path.abspath(target)})
        click.echo(f"Pool {name} defined")

    _run(ctx, go)


def _pool_simple(verb: str, method: str, done: str, help_: str) -> click.Command:
    @click.command(verb, help=help_)
    @_pool_arg()
    @click.pass_context
    def cmd(ctx: click.Context, pool: str) -> None:
        def go(c: Any) -> None:
            getattr(c, method)(pool)
            click.echo(done.format(pool))

        _run(ctx, go)

    return cmd


pool_start = _pool_simple("pool-start", "pool_start", "Pool {} started", "Start a pool.")
pool_destroy = _pool_simple("pool-destroy", "pool_stop", "Pool {} destroyed",
                            "Stop a pool (its files stay).")
pool_undefine = _pool_simple("pool-undefine", "pool_undefine", "Pool {} has been undefined",
                             "Forget an inactive pool (its files stay).")
pool_refresh = _pool_simple("pool-refresh", "pool_refresh", "Pool {} refreshed",
                            "Look at the pool's directory again.")


@click.command("pool-info")
@_pool_arg()
@_json_opt
@click.pass_context
def pool_info(ctx: click.Context, pool: str, as_json: bool) -> None:
    """Information about a pool."""

    def go(c: Any) -> None:
        p = c.pool_info(pool)
        if as_json:
            _echo_json(p)
            return
        active = p.get("state") == "active"
        rows: list[tuple[str, object]] = [
            ("Name", p.get("name")), ("UUID", p.get("uuid", "")),
            ("State", "running" if active else "inactive"), ("Persistent", "yes"),
            ("Autostart", _yes(p.get("autostart")))]
        if active:
            rows += [("Capacity", pretty_capacity(p.get("capacity"))),
                     ("Allocation", pretty_capacity(p.get("allocation"))),
                     ("Available", pretty_capacity(p.get("available")))]
        _info(rows)

    _run(ctx, go, blank=not as_json)


@click.command("pool-autostart")
@_pool_arg()
@click.option("--disable", is_flag=True, help="Do not start it with the daemon.")
@click.pass_context
def pool_autostart(ctx: click.Context, pool: str, disable: bool) -> None:
    """Start the pool when the daemon starts."""

    def go(c: Any) -> None:
        _method(c, "pool_set_autostart", "pool autostart")(pool, not disable)
        click.echo(f"Pool {pool} {'unmarked' if disable else 'marked'} as autostarted")

    _run(ctx, go)


# ------------------------------------------------------------------ volumes

@click.command("vol-list")
@_pool_arg()
@click.option("--details", is_flag=True, help="Also type, capacity and allocation.")
@_json_opt
@click.pass_context
def vol_list(ctx: click.Context, pool: str, details: bool, as_json: bool) -> None:
    """List a pool's volumes."""

    def go(c: Any) -> None:
        vols = sorted(c.vol_list(pool), key=lambda v: v.get("name", ""))
        if as_json:
            _echo_json(vols)
        elif details:
            click.echo(table(("Name", "Path", "Type", "Capacity", "Allocation"),
                             [(v.get("name"), v.get("path"), "file",
                               pretty_capacity(v.get("capacity")),
                               pretty_capacity(v.get("allocation"))) for v in vols]))
        else:
            click.echo(table(("Name", "Path"), [(v.get("name"), v.get("path")) for v in vols]))

    _run(ctx, go, blank=not as_json)


@click.command("vol-create-as")
@_pool_arg()
@click.argument("name")
@click.argument("capacity")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="qcow2",
              show_default=True, help="The image format.")
@click.option("--backing-vol", metavar="VOL",
              help="VOL (this pool) or POOL/VOL: the new qcow2 volume is an overlay of it "
                   "(CAPACITY 0: the backing volume's).")
@click.option("--backing-vol-format", hidden=True)
@click.option("--prealloc-metadata", is_flag=True, help="Allocate qcow2 metadata up front.")
@click.pass_context
def vol_create_as(ctx: click.Context, pool: str, name: str, capacity: str, fmt: str,
                  backing_vol: str | None, backing_vol_format: str | None,
                  prealloc_metadata: bool) -> None:
    """Create a volume of CAPACITY bytes (10G, 512M, ...)."""

    def go(c: Any) -> None:
        size = parse_scaled(capacity, "capacity")
        tid = _task_id(c.vol_create(pool, name, size, format=fmt, backing=backing_vol,
                                    prealloc=prealloc_metadata))
        _wait(c, tid, f"creating {name}")
        click.echo(f"Vol {name} created")

    _run(ctx, go)


@click.command("vol-clone")
@click.argument("vol")
@click.argument("newname")
@_pool_opt
@click.option("--mode", type=click.Choice(["copy", "overlay"]), default="copy",
              show_default=True,
              help="copy: a full copy; overlay: a qcow2 volume backed by VOL.")
@click.pass_context
def vol_clone(ctx: click.Context, vol: str, newname: str, pool: str, mode: str) -> None:
    """Clone a volume in its pool."""

    def go(c: Any) -> None:
        _wait(c, _task_id(c.vol_clone(pool, vol, newname, mode=mode)), f"cloning {vol}")
        click.echo(f"Vol {newname} cloned from {vol}")

    _run(ctx, go)


@click.command("vol-delete")
@click.argument("vol")
@_pool_opt
@click.pass_context
def vol_delete(ctx: click.Context, vol: str, pool: str) -> None:
    """Delete a volume (refused while a defined domain uses it)."""

    def go(c: Any) -> None:
        c.vol_delete(pool, vol)
        click.echo(f"Vol {vol} deleted")

    _run(ctx, go)


@click.command("vol-resize")
@click.argument("vol")
@click.argument("capacity")
@_pool_opt
@click.pass_context
def vol_resize(ctx: click.Context, vol: str, capacity: str, pool: str) -> None:
    """Change a volume's capacity (10G, ...)."""

    def go(c: Any) -> None:
        size = parse_scaled(capacity, "capacity")
        c.vol_resize(pool, vol, size)
        click.echo(f"Size of volume '{vol}' successfully changed to {capacity}")

    _run(ctx, go)


@click.command("vol-info")
@click.argument("vol")
@_pool_opt
@_json_opt
@click.pass_context
def vol_info(ctx: click.Context, vol: str, pool: str, as_json: bool) -> None:
    """Information about a volume."""

    def go(c: Any) -> None:
        v = c.vol_info(pool, vol)
        if as_json:
            _echo_json(v)
            return
        _info([("Name", v.get("name")), ("Type", "file"), ("Format", v.get("format")),
               ("Capacity", pretty_capacity(v.get("capacity"))),
               ("Allocation", pretty_capacity(v.get("allocation")))]
              + ([("Backing", v["backing"])] if v.get("backing") else []))

    _run(ctx, go, blank=not as_json)


@click.command("vol-path")
@click.argument("vol")
@_pool_opt
@click.pass_context
def vol_path(ctx: click.Context, vol: str, pool: str) -> None:
    """The volume's file."""

    def go(c: Any) -> None:
        click.echo(str(c.vol_info(pool, vol).get("path")))

    _run(ctx, go)


@click.command("vol-upload")
@click.argument("vol")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_pool_opt
@click.pass_context
def vol_upload(ctx: click.Context, vol: str, file: str, pool: str) -> None:
    """Write FILE's bytes into an existing volume (raw guest data)."""

    def go(c: Any) -> None:
        try:
            f = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
        except OSError as exc:
            raise CliError(f"{file}: {exc.strerror or exc}") from None
        try:
            length: int | None = None
            if file != "-":
                length = os.fstat(f.fileno()).st_size
            c.vol_upload(pool, vol, f, length)
        finally:
            if file != "-":
                f.close()

    _run(ctx, go)


@click.command("vol-import")
@_pool_arg()
@click.argument("name")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]),
              help="SOURCE's format (default: probed).")
@click.option("--move", is_flag=True, help="Move SOURCE into the pool instead of copying it.")
@click.pass_context
def vol_import(ctx: click.Context, pool: str, name: str, source: str, fmt: str | None,
               move: bool) -> None:
    """Import an existing image into a pool as volume NAME (pyvirt's own verb)."""

    def go(c: Any) -> None:
        tid = _task_id(c.vol_import(pool, name, os.path.abspath(source), format=fmt,
                                    mode="move" if move else "copy"))
        _wait(c, tid, f"importing {source}")
        click.echo(f"Vol {name} imported from {source}")

    _run(ctx, go)


# ----------------------------------------------------------------- networks

@click.command("net-list")
@click.option("--all", "all_", is_flag=True, help="Active and inactive networks.")
@click.option("--inactive", is_flag=True, help="Only inactive networks.")
@_json_opt
@click.pass_context
def net_list(ctx: click.Context, all_: bool, inactive: bool, as_json: bool) -> None:
    """List networks (the active ones unless --all or --inactive)."""

    def go(c: Any) -> None:
        nets = sorted(c.net_list(), key=lambda n: n.get("name", ""))
        if inactive and not all_:
            nets = [n for n in nets if not _net_active(n)]
        elif not all_:
            nets = [n for n in nets if _net_active(n)]
        if as_json:
            _echo_json(nets)
        else:
            click.echo(table(("Name", "State", "Autostart", "Persistent"),
                             [(n.get("name"), "active" if _net_active(n) else "inactive",
                               _yes(n.get("autostart")), "yes") for n in nets]))

    _run(ctx, go, blank=not as_json)


def _net_active(n: dict[str, Any]) -> bool:
    if "active" in n:
        return bool(n["active"])
    return n.get("state") == "active"


@click.command("net-define")
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def net_define(ctx: click.Context, file: str) -> None:
    """Define a network from a JSON or YAML document."""

    def go(c: Any) -> None:
        doc = _read_document(file)
        net = c.net_define(doc)
        click.echo(f"Network {net.get('name', doc.get('name'))} defined from {file}")

    _run(ctx, go)


def _net_simple(verb: str, method: str, done: str, help_: str) -> click.Command:
    @click.command(verb, help=help_)
    @_net_arg()
    @click.pass_context
    def cmd(ctx: click.Context, network: str) -> None:
        def go(c: Any) -> None:
            getattr(c, method)(network)
            click.echo(done.format(network))

        _run(ctx, go)

    return cmd


net_start = _net_simple("net-start", "net_start", "Network {} started",
                        "Start a network (bridge, firewall rules, DHCP).")
net_destroy = _net_simple("net-destroy", "net_stop", "Network {} destroyed",
                          "Stop a network and remove what it added to the host.")
net_undefine = _net_simple("net-undefine", "net_undefine", "Network {} has been undefined",
                           "Forget an inactive network.")


@click.command("net-info")
@_net_arg()
@_json_opt
@click.pass_context
def net_info(ctx: click.Context, network: str, as_json: bool) -> None:
    """Information about a network."""

    def go(c: Any) -> None:
        n = c.net_info(network)
        if as_json:
            _echo_json(n)
            return
        _info([("Name", n.get("name")), ("UUID", n.get("uuid", "")),
               ("Active", _yes(_net_active(n))), ("Persistent", "yes"),
               ("Autostart", _yes(n.get("autostart"))), ("Bridge", n.get("bridge", "")),
               ("Mode", n.get("mode", "")), ("IPv4", n.get("ipv4", ""))])

    _run(ctx, go, blank=not as_json)


@click.command("net-autostart")
@_net_arg()
@click.option("--disable", is_flag=True, help="Do not start it with the daemon.")
@click.pass_context
def net_autostart(ctx: click.Context, network: str, disable: bool) -> None:
    """Start the network when the daemon starts."""

    def go(c: Any) -> None:
        c.net_set_autostart(network, not disable)
        click.echo(f"Network {network} {'unmarked' if disable else 'marked'} as autostarted")

    _run(ctx, go)


@click.command("net-dhcp-leases")
@_net_arg()
@click.option("--mac", metavar="MAC", help="Only the lease of this MAC address.")
@_json_opt
@click.pass_context
def net_dhcp_leases(ctx: click.Context, network: str, mac: str | None, as_json: bool) -> None:
    """The DHCP leases dnsmasq handed out on a network."""

    def go(c: Any) -> None:
        leases = c.net_leases(network)
        if mac:
            leases = [x for x in leases if str(x.get("mac", "")).lower() == mac.lower()]
        if as_json:
            _echo_json(leases)
            return
        prefix = ""
        if any("/" not in str(x.get("ip", "")) for x in leases):
            cidr = str(c.net_info(network).get("ipv4") or "")
            prefix = "/" + cidr.split("/", 1)[1] if "/" in cidr else ""
        rows = []
        for x in leases:
            ip = str(x.get("ip", ""))
            rows.append((_time(x.get("expires"), "%Y-%m-%d %H:%M:%S"), x.get("mac"), "ipv4",
                         ip if "/" in ip else ip + prefix, x.get("hostname") or "-",
                         x.get("client_id") or "-"))
        click.echo(table(("Expiry Time", "MAC address", "Protocol", "IP address",
                          "Hostname", "Client ID or DUID"), rows))

    _run(ctx, go, blank=not as_json)


# ------------------------------------------------------------------- events

#: our domain event -> (libvirt's lifecycle event, its detail, whether the
#: event's own detail (a reason) picks the detail instead)
_LIFECYCLE = {"defined": ("Defined", "Added", True), "undefined": ("Undefined", "Removed", False),
              "started": ("Started", "Booted", True), "suspended": ("Suspended", "Paused", False),
              "resumed": ("Resumed", "Unpaused", False), "stopped": ("Stopped", "Shutdown", True),
              "shutdown": ("Stopped", "Shutdown", False), "crashed": ("Stopped", "Crashed", False),
              "saved": ("Stopped", "Saved", False), "restored": ("Started", "Restored", False)}
#: reasons (the event's detail, before any ": why") -> libvirt's detail words
_DETAIL = {"booted": "Booted", "restored": "Restored", "from snapshot": "Snapshot",
           "destroyed": "Destroyed", "crashed": "Crashed", "saved": "Saved",
           "failed": "Failed", "shutdown": "Shutdown", "updated": "Updated"}


def describe_event(ev: dict[str, Any], every: bool) -> str | None:
    """virsh's line for an event (``event 'lifecycle' for domain 'x': Started
    Booted``); None for an event virsh would not show (only lifecycle events
    unless ``every``)."""
    kind, obj, name = ev.get("kind"), ev.get("object"), str(ev.get("event", ""))
    detail = str(ev.get("detail") or "")
    reason = detail.split(":", 1)[0].strip().lower()
    if kind == "domain" and name in _LIFECYCLE:
        what, word, consult = _LIFECYCLE[name]
        if consult:
            word = _DETAIL.get(reason, word)
        if name == "crashed" and reason == "panicked":  # the guest itself crashed
            what, word = "Crashed", "Panicked"
        return f"event 'lifecycle' for domain '{obj}': {what} {word}"
    if not every:
        return None
    if kind == "domain" and name == "rebooted":
        return f"event 'reboot' for domain '{obj}'"
    tail = f": {_one_line(detail)}" if detail else ""
    if kind == "domain":
        return f"event '{name}' for domain '{obj}'{tail}"
    return f"event '{name}' for {kind} '{obj}'{tail}"


@click.command()
@click.option("--loop", is_flag=True, help="Keep waiting for events (Ctrl-C ends).")
@click.option("--all", "every", is_flag=True,
              help="Every event (tasks, pools, networks, snapshots), not only lifecycle ones.")
@click.option("--domain", metavar="DOMAIN", shell_complete=_complete_domains,
              help="Only this domain's events.")
@click.option("--event", "event_name", type=click.Choice(["lifecycle"]), hidden=True)
@click.option("--timestamp", is_flag=True, help="Prefix each event with the time it happened.")
@_json_opt
@click.pass_context
def event(ctx: click.Context, loop: bool, every: bool, domain: str | None,
          event_name: str | None, timestamp: bool, as_json: bool) -> None:
    """Wait for events and print them (one, or all of them with --loop)."""
    count = 0

    def go(c: Any) -> None:
        nonlocal count
        try:
            for ev in c.events():
                if ev.get("event") == "overflow":
                    raise CliError("the event stream fell behind and was closed by the daemon")
                if domain is not None and not (ev.get("kind") == "domain"
                                               and ev.get("object") == domain):
                    continue
                line = describe_event(ev, every)
                if line is None:
                    continue
                count += 1
                if as_json:
                    _echo_json_line(ev)
                else:
                    if timestamp:
                        line = _time(ev.get("time"), "%Y-%m-%d %H:%M:%S%z") + ": " + line
                    click.echo(line)
                sys.stdout.flush()
                if not loop:
                    break
        except KeyboardInterrupt:
            if not as_json:
                click.echo("event loop interrupted")
        if not as_json:
            click.echo(f"events received: {count}")

    _run(ctx, go, blank=False)


# -------------------------------------------------------------- pyvirt create

def _disk_spec(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CliError(f"--disk {_one_line(text)}: '{_one_line(part)}' is not KEY=VALUE")
        if key not in ("size", "pool", "format", "vol", "path", "readonly", "serial", "cache",
                       "discard"):
            raise CliError(f"--disk {_one_line(text)}: unknown key '{_one_line(key)}' (size, "
                           "pool, format, vol, path, readonly, serial, cache, discard)")
        fields[key] = value
    sources = [k for k in ("size", "vol", "path") if k in fields]
    if len(sources) != 1:
        raise CliError(f"--disk {_one_line(text)}: exactly one of size=, vol=, path= is needed")
    return fields


def _extras(fields: dict[str, str], spec: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("readonly", "discard"):
        if key in fields:
            if fields[key] not in ("on", "off", "yes", "no", "true", "false"):
                raise CliError(f"--disk {_one_line(spec)}: {key} must be on or off")
            out[key] = fields[key] in ("on", "yes", "true")
    for key in ("serial", "cache"):
        if key in fields:
            out[key] = fields[key]
    return out


@click.command()
@click.option("--name", "-n", required=True, help="The new domain's name.")
@click.option("--memory", default="512", show_default=True, metavar="SIZE",
              help="RAM in MiB (or with a unit: 2G).")
@click.option("--vcpus", "--cpus", "cpus", type=click.IntRange(1, 255), default=1,
              show_default=True, help="Number of vCPUs.")
@click.option("--disk", "disks", multiple=True, metavar="SPEC",
              help="size=N[,pool=P][,format=qcow2|raw]: a new volume of N GiB (or 10G, 512M) "
                   "in pool P (default: default); vol=POOL/VOL: an existing volume; "
                   "path=FILE: an image file. Also readonly=, serial=, cache=, discard=. "
                   "Repeatable: vda, vdb, ...")
@click.option("--import", "import_image", metavar="IMAGE", type=click.Path(dir_okay=False),
              help="Copy IMAGE into the default pool and boot from it (the first disk).")
@click.option("--kernel", metavar="PATH", help="Kernel (default: the default guest's).")
@click.option("--initrd", metavar="PATH", help="initramfs (with --kernel).")
@click.option("--cmdline", metavar="TEXT", help="Extra kernel command line.")
@click.option("--network", "networks", multiple=True, metavar="SPEC",
              help="network=NAME (a TAP on that network), user (user-mode), or none. "
                   "Default: the 'default' network when it is active, else user.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "emu"]), help="CPU backend.")
@click.option("--description", default="", help="A description.")
@click.option("--autostart", is_flag=True, help="Start it whenever the daemon starts.")
@click.option("--noautoconsole", is_flag=True, help="Do not attach to the console.")
@click.option("--print-definition", is_flag=True,
              help="Print the definition and exit (nothing is created).")
@click.pass_context
def create(ctx: click.Context, name: str, memory: str, cpus: int, disks: tuple[str, ...],
           import_image: str | None, kernel: str | None, initrd: str | None,
           cmdline: str | None, networks: tuple[str, ...], accel: str | None, description: str,
           autostart: bool, noautoconsole: bool, print_definition: bool) -> None:
    """Create a domain and start it (virt-install's way)."""

    def go(c: Any) -> None:
        mem = parse_scaled(memory, "--memory", "mib")
        doc: dict[str, Any] = {"name": name, "memory": mem, "cpus": cpus}
        if description:
            doc["description"] = description
        if autostart:
            doc["autostart"] = True
        if accel:
            doc["accel"] = accel
        if initrd and not kernel:
            raise CliError("--initrd: only with --kernel")
        for key, value in (("kernel", kernel), ("initrd", initrd)):
            if value:
                doc[key] = os.path.abspath(value)
        if cmdline:
            doc["cmdline"] = cmdline
        # the volumes to make before defining: (pool, vol, capacity, format)
        to_make: list[tuple[str, str, int, str]] = []
        to_import: tuple[str, str, str] | None = None
        entries: list[dict[str, Any]] = []
        taken: set[str] = set()

        def vol_name(ext: str) -> str:
            n = 0
            while True:
                cand = f"{name}.{ext}" if n == 0 else f"{name}-{n}.{ext}"
                if cand not in taken:
                    taken.add(cand)
                    return cand
                n += 1

        if import_image is not None:
            if not os.path.isfile(import_image):
                raise CliError(f"--import {_one_line(import_image)}: no such file")
            ext = "qcow2" if _looks_qcow2(import_image) else "img"
            vol = vol_name(ext)
            to_import = ("default", vol, os.path.abspath(import_image))
            entries.append({"volume": f"default/{vol}"})
        for spec in disks:
            f = _disk_spec(spec)
            extra = _extras(f, spec)
            if "size" in f:
                fmt = f.get("format", "qcow2")
                if fmt not in ("qcow2", "raw"):
                    raise CliError(f"--disk {_one_line(spec)}: format must be qcow2 or raw")
                size = parse_scaled(f["size"], f"--disk {spec}: size", "gib")
                pool = f.get("pool", "default")
                vol = vol_name("qcow2" if fmt == "qcow2" else "img")
                to_make.append((pool, vol, size, fmt))
                entries.append({"volume": f"{pool}/{vol}", **extra})
            elif "vol" in f:
                if "/" not in f["vol"]:
                    raise CliError(f"--disk {_one_line(spec)}: vol= takes POOL/VOLUME")
                entries.append({"volume": f["vol"], **extra})
            else:
                entry: dict[str, Any] = {"path": os.path.abspath(f["path"]), **extra}
                if "format" in f:
                    entry["format"] = f["format"]
                entries.append(entry)
        if entries:
            doc["disks"] = entries
        nics: list[dict[str, Any]] = []
        if "none" in networks and len(networks) > 1:
            raise CliError("--network none: cannot be given with other --network options")
        for spec in networks:
            if spec == "none":
                continue
            if spec == "user":
                nics.append({"kind": "user"})
            elif spec.startswith("network="):
                nics.append({"network": spec.split("=", 1)[1]})
            else:
                raise CliError(f"--network {_one_line(spec)}: use network=NAME, user or none")
        if not networks:
            nics.append(_default_nic(c) if not print_definition else {"network": "default"})
        doc["nics"] = nics
        if print_definition:
            _echo_json(doc)
            return
        interactive = not noautoconsole and sys.stdin.isatty()
        made: list[tuple[str, str]] = []
        try:
            if to_import is not None:
                pool, vol, src = to_import
                _wait(c, _task_id(c.vol_import(pool, vol, src, mode="copy")),
                      f"importing {os.path.basename(src)}")
                made.append((pool, vol))
            for pool, vol, size, fmt in to_make:
                _wait(c, _task_id(c.vol_create(pool, vol, size, format=fmt)),
                      f"creating {vol}")
                made.append((pool, vol))
            c.define(doc)
        except (PyvirtError, KeyboardInterrupt):
            # nothing half made: the volumes this command created go again
            for pool, vol in reversed(made):
                with contextlib.suppress(PyvirtError):
                    c.vol_delete(pool, vol)
            raise
        click.echo(f"Domain '{name}' defined")
        c.start(name)
        click.echo(f"Domain '{name}' started")
        if interactive:
            _console(c, name)
        elif not noautoconsole:
            click.echo(f"Domain '{name}' is running: `pyvirt console {name}` attaches to it")

    _run(ctx, go)


def _looks_qcow2(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"QFI\xfb"
    except OSError as exc:
        raise CliError(f"--import {path}: {exc.strerror or exc}") from None


def _default_nic(c: Any) -> dict[str, Any]:
    """virt-install's default: the 'default' network when there is one running."""
    try:
        if _net_active(c.net_info("default")):
            return {"network": "default"}
    except PyvirtError:
        pass
    return {"kind": "user"}


# ---- clone, disks and NICs (definition edits: a running domain gets them at its next start)

def _disk_index(target: str) -> int:
    """``vdb`` (or ``1``) as the disk's index."""
    t = target.strip()
    if t.isdigit():
        return int(t)
    letters = t[2:] if t.startswith("vd") else ""
    if not letters or not letters.isalpha() or not letters.islower() or len(letters) > 2:
        raise CliError(f"{_one_line(target)}: not a disk target (vda, vdb, ...)")
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def _applies(answer: dict[str, Any]) -> str:
    return " (at the next start)" if answer.get("applies") == "next-start" else ""


@click.command()
@_domain_arg("source")
@click.argument("new")
@click.option("--description", default=None, help="The new domain's description.")
@click.pass_context
def clone(ctx: click.Context, source: str, new: str, description: str | None) -> None:
    """A copy of the shut-off domain SOURCE named NEW (its disks copied; new uuid and MACs)."""

    def go(c: Any) -> None:
        _wait(c, _task_id(c.clone(source, new, description)), f"cloning {source}")
        click.echo(f"Domain '{new}' cloned from '{source}'")

    _run(ctx, go)


@click.command("attach-disk")
@_domain_arg()
@click.argument("volume", required=False)
@click.option("--pool", default="default", show_default=True, help="The storage pool.")
@click.option("--size", default=None, help="A new volume of this size (10G, 512M).")
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2",
              show_default=True, help="The new volume's format.")
@click.pass_context
def attach_disk(ctx: click.Context, domain: str, volume: str | None, pool: str,
                size: str | None, fmt: str) -> None:
    """Add the existing volume VOLUME (POOL/VOL or VOL of --pool), or a new one of --size."""
    if (volume is None) == (size is None):
        raise click.UsageError("give a VOLUME or --size (a new volume), not both")
    if volume is not None and "/" in volume:
        pool, _, volume = volume.partition("/")

    def go(c: Any) -> None:
        size_bytes = parse_scaled(size, "--size", "m") if size is not None else None
        got = c.disk_add(domain, pool, volume=volume, size_bytes=size_bytes, format=fmt)
        click.echo(f"Disk {got.get('target')} ({got.get('volume')}) attached to "
                   f"'{domain}'{_applies(got)}")

    _run(ctx, go)


@click.command("detach-disk")
@_domain_arg()
@click.argument("target")
@click.option("--remove-storage", is_flag=True, help="Also delete its volume.")
@click.pass_context
def detach_disk(ctx: click.Context, domain: str, target: str, remove_storage: bool) -> None:
    """Remove the disk TARGET (vdb) from DOMAIN's definition."""
    def go(c: Any) -> None:
        index = _disk_index(target)
        c.disk_remove(domain, index, remove_storage=remove_storage)
        click.echo(f"Disk {target} detached from '{domain}'")

    _run(ctx, go)


@click.command()
@_domain_arg()
@click.argument("target")
@click.argument("size")
@click.pass_context
def blockresize(ctx: click.Context, domain: str, target: str, size: str) -> None:
    """Grow the disk TARGET (vda) of the shut-off DOMAIN to SIZE (10G; a bare number: KiB)."""
    def go(c: Any) -> None:
        index = _disk_index(target)
        size_bytes = parse_scaled(size, "size", "k")
        c.disk_resize(domain, index, size_bytes)
        click.echo(f"Block device '{target}' is resized")

    _run(ctx, go)


@click.command("attach-interface")
@_domain_arg()
@click.argument("type_", metavar="TYPE", type=click.Choice(["network"]))
@click.argument("source")
@click.option("--mac", default=None, help="Its MAC address (default: derived).")
@click.option("--model", type=click.Choice(["virtio"]), default=None, help="The NIC model.")
@click.pass_context
def attach_interface(ctx: click.Context, domain: str, type_: str, source: str,
                     mac: str | None, model: str | None) -> None:
    """Add a NIC on the virtual network SOURCE."""

    def go(c: Any) -> None:
        got = c.iface_add(domain, source, mac=mac, model=model)
        click.echo(f"Interface {got.get('mac')} attached to '{domain}'{_applies(got)}")

    _run(ctx, go)


@click.command("detach-interface")
@_domain_arg()
@click.argument("type_", metavar="TYPE", type=click.Choice(["network", "user", "tap"]))
@click.option("--mac", default=None, help="Which one (needed when several are of TYPE).")
@click.pass_context
def detach_interface(ctx: click.Context, domain: str, type_: str, mac: str | None) -> None:
    """Remove a NIC of TYPE (the one with --mac) from DOMAIN's definition."""

    def go(c: Any) -> None:
        nics = c.iface_list(domain)
        found = [i for i, n in enumerate(nics) if n.get("type") == type_
                 and (mac is None or str(n.get("mac")).lower() == mac.lower())]
        if not found:
            raise CliError(f"domain '{domain}' has no {type_} interface"
                           + (f" with MAC {_one_line(mac)}" if mac else ""))
        if len(found) > 1:
            raise CliError(f"domain '{domain}' has {len(found)} {type_} interfaces: "
                           "say which with --mac")
        c.iface_remove(domain, found[0])
        click.echo(f"Interface detached from '{domain}'")

    _run(ctx, go)

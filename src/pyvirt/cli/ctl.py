"""``pyvirt ctl SOCKET ACTION``: drive a running VM through its API socket.

Errors are one line on stderr: exit status 2 when the request or the VM's
state is wrong (an answer 4xx, e.g. "pause: the VM is already paused"), 1 when
no VMM answers or it failed (5xx). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["ctl"]


@click.group("ctl")
@click.argument("socket", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for an answer (snapshots: at least 600).")
@click.pass_context
def ctl(ctx: click.Context, socket: Path, timeout: float) -> None:
    """Control the running VM whose API socket is SOCKET (pyvirt run --api-socket)."""
    obj = ctx.ensure_object(dict)
    obj["socket"] = socket
    obj["timeout"] = timeout


def _act(ctx: click.Context, fn: Callable[[Any], object]) -> None:
    """Run ``fn(client)``; a pyvirt error becomes one line and an exit status."""
    from pyvirt.api.client import VmClient
    from pyvirt.cli.main import one_line
    from pyvirt.errors import PyvirtError

    obj = ctx.find_object(dict) or {}
    timeout = float(obj.get("timeout", 30.0))
    try:
        with VmClient(obj["socket"], timeout=timeout,
                      snapshot_timeout=max(600.0, timeout)) as vm:
            fn(vm)
    except PyvirtError as exc:
        if obj.get("debug"):
            raise
        click.echo(f"pyvirt: error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        sys.exit(130)


def _simple(name: str, method: str, done: str, help_text: str) -> None:
    @ctl.command(name, help=help_text)
    @click.pass_context
    def command(ctx: click.Context) -> None:
        def go(vm: Any) -> None:
            getattr(vm, method)()
            click.echo(done)
        _act(ctx, go)


_simple("pause", "pause", "paused", "Park every vCPU (the VM must be running).")
_simple("resume", "resume", "resumed", "Run a paused VM again.")
_simple("power-button", "power_button", "power button pressed",
        "Press the ACPI power button: the guest shuts down cleanly if it listens.")
_simple("reset", "reset", "reset", "Reset the machine, as the reset button does.")
_simple("ctrl-alt-del", "ctrl_alt_del", "ctrl-alt-del sent",
        "Send Ctrl+Alt+Del to the guest's keyboard.")
_simple("stop", "stop", "stopped", "Stop the VM at once (force-stop: nothing is saved).")


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """The VM's state, uptime, backend and configuration."""
    def go(vm: Any) -> None:
        data = vm.info()
        click.echo(json.dumps(data, indent=2) if as_json else summary(data))
    _act(ctx, go)


@ctl.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.pass_context
def snapshot(ctx: click.Context, directory: Path) -> None:
    """Snapshot the paused VM into DIRECTORY (which must not exist yet)."""
    def go(vm: Any) -> None:
        res = vm.snapshot(directory)
        mib = res.get("memory_bytes_written", 0) / (1 << 20)
        click.echo(f"snapshot written to {res.get('path', directory)} "
                   f"({mib:.1f} MiB of memory in {res.get('seconds', 0):.2f} s)")
    _act(ctx, go)


@ctl.command()
@click.argument("disk", type=click.IntRange(0, 255))
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def overlay(ctx: click.Context, disk: int, path: Path) -> None:
    """Put a new qcow2 overlay at PATH on top of disk DISK (0 is vda) of the paused VM;
    the disk goes on writing there, its old top image becomes the read-only backing file."""
    def go(vm: Any) -> None:
        res = vm.disk_overlay(disk, path)
        click.echo(f"disk {res.get('disk', disk)}: now on {res.get('path', path)} "
                   f"(backing file {res.get('backing', '?')})")
    _act(ctx, go)


@ctl.command()
@click.argument("nic", type=click.IntRange(0, 255))
@click.argument("state", type=click.Choice(["up", "down"]))
@click.pass_context
def link(ctx: click.Context, nic: int, state: str) -> None:
    """Set NIC's link up or down (down: as if its cable were pulled)."""
    def go(vm: Any) -> None:
        vm.set_nic_link(nic, state == "up")
        click.echo(f"nic {nic}: link {state}")
    _act(ctx, go)


@ctl.command()
@click.pass_context
def metrics(ctx: click.Context) -> None:
    """The VM's counters in the Prometheus text format."""
    _act(ctx, lambda vm: click.echo(vm.metrics().text, nl=False))


def summary(info: dict[str, Any]) -> str:
    """``GET /vm`` for people: what a glance needs, the rest via --json."""
    cfg = info.get("config")
    if not isinstance(cfg, dict):
        cfg = {}
    rows: list[tuple[str, str]] = [
        ("state", str(info.get("state", "?"))),
        ("backend", str(info.get("backend", "?"))),
        ("uptime", _duration(info.get("uptime_s"))),
        ("boots", str(info.get("boot_count", "?"))),
    ]
    if isinstance(cfg.get("cpus"), int):
        rows.append(("cpus", str(cfg["cpus"])))
    mem = cfg.get("memory")
    if isinstance(mem, int) and not isinstance(mem, bool):
        rows.append(("memory", f"{mem >> 20} MiB"))
    elif isinstance(mem, str):
        rows.append(("memory", mem))
    if cfg.get("kernel"):
        rows.append(("kernel", str(cfg["kernel"])))
    disks = cfg.get("disks")
    if isinstance(disks, list):
        for i, d in enumerate(disks):
            path = d.get("path") if isinstance(d, dict) else d
            ro = " (read-only)" if isinstance(d, dict) and d.get("readonly") else ""
            rows.append((f"disk {i}", f"{path}{ro}"))
    nics = info.get("nics")
    if isinstance(nics, list):
        for n in nics:
            if isinstance(n, dict):
                link = "up" if n.get("link_up") else "down"
                rows.append((f"nic {n.get('index', '?')}",
                             f"{n.get('kind', '?')} {n.get('mac', '?')} link {link}"))
    rows.append(("pyvirt", str(info.get("pyvirt_version", "?"))))
    from pyvirt.cli.main import one_line

    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {one_line(v)}" for k, v in rows)


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"

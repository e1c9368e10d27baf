"""The ``pyvirt`` command line.

``pyvirt run`` boots one VM in the foreground; ``pyvirt guest build`` makes
the default guest. Bad input prints one line naming the problem and exits 2;
no tracebacks reach the user (``--debug`` shows them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from pyvirt.errors import PyvirtError

__all__ = ["cli", "main"]


class _Size(click.ParamType[int]):
    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from pyvirt.vmm.config import ConfigError, parse_size

        try:
            return parse_size(str(value))
        except ConfigError as exc:
            self.fail(str(exc).split(": ", 1)[-1], param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show debug logs and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """pyvirt: run virtual machines on KVM or on a software CPU."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="pyvirt: %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=True),
              help="Linux bzImage or ELF vmlinux (default: the default guest's kernel).")
@click.option("--initrd", type=click.Path(path_type=Path, dir_okay=True),
              help="initramfs (default: the default guest's, when --kernel is not given).")
@click.option("--cmdline", default="", help="Extra kernel command line.")
@click.option("--cpus", type=int, default=1, show_default=True, help="Number of vCPUs.")
@click.option("--memory", "-m", type=_Size(), default="512M", show_default=True,
              help="Guest RAM, e.g. 512M or 2G (plain numbers are MiB).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "emu"]), default="auto",
              show_default=True, help="CPU backend: KVM, the software CPU, or pick.")
@click.option("--console", "console_spec", default="stdio", show_default=True,
              help="Serial console: stdio, none or file:PATH.")
@click.option("--on-reboot", type=click.Choice(["restart", "exit"]), default="restart",
              show_default=True, help="What a guest reboot does.")
@click.option("--verbose", "-v", is_flag=True, help="Say which accelerator is used and why.")
@click.pass_context
def run(ctx: click.Context, kernel: Path | None, initrd: Path | None, cmdline: str, cpus: int,
        memory: int, accel: str, console_spec: str, on_reboot: str, verbose: bool) -> None:
    """Boot a VM in the foreground (the default guest when no --kernel is given).

    The serial console is on this terminal: Ctrl-A x quits. Commands piped
    into stdin run in the guest's shell. Exit status: 0 on guest power-off
    (or reboot with --on-reboot exit), 1 if the guest crashed, 2 on bad input.
    """
    from pyvirt.vmm.config import VmConfig, parse_console
    from pyvirt.vmm.runner import run_vm

    def go() -> int:
        k, i = kernel, initrd
        if k is None:
            from pyvirt.guest.build import build_default_guest, default_guest, guest_is_built

            if not guest_is_built():
                build_default_guest(log=lambda s: click.echo(f"pyvirt: {s}", err=True))
            g = default_guest()
            k = g.kernel
            i = i if i is not None else g.initrd
        cfg = VmConfig(kernel=k, initrd=i, cmdline=cmdline, cpus=cpus, memory=memory,
                       accel=accel,  # type: ignore[arg-type]
                       console=parse_console(console_spec),
                       on_reboot=on_reboot,  # type: ignore[arg-type]
                       verbose=verbose)
        return run_vm(cfg)

    sys.exit(_guarded(ctx, go))


@cli.group()
def guest() -> None:
    """The default guest (Debian kernel + our initramfs)."""


@guest.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when already built.")
@click.pass_context
def guest_build(ctx: click.Context, force: bool) -> None:
    """Download the Debian kernel and busybox and write the initramfs."""
    from pyvirt.guest.build import build_default_guest

    def go() -> int:
        g = build_default_guest(force=force, log=lambda s: click.echo(f"pyvirt: {s}", err=True))
        click.echo(f"kernel: {g.kernel}\ninitrd: {g.initrd}")
        return 0

    sys.exit(_guarded(ctx, go))


def _guarded(ctx: click.Context, fn: Callable[[], int]) -> int:
    """Run ``fn``; turn pyvirt errors into one line on stderr and an exit status."""
    try:
        return int(fn())
    except PyvirtError as exc:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        click.echo(f"pyvirt: error: {exc}", err=True)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


def main() -> None:
    cli(prog_name="pyvirt")

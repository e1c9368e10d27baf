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

__all__ = ["cli", "main", "one_line"]


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
              help="Console: stdio (serial ttyS0), virtio (hvc0 on this terminal), none "
                   "or file:PATH.")
@click.option("--disk", "disks", multiple=True, metavar="SPEC",
              help="A virtio-blk disk (repeatable; vda, vdb, ... in order): "
                   "path=FILE[,readonly=on][,serial=ID][,cache=none|writeback][,discard=on].")
@click.option("--rng/--no-rng", default=True, show_default=True,
              help="A virtio-rng device fed by the host's getrandom.")
@click.option("--on-reboot", type=click.Choice(["restart", "exit"]), default="restart",
              show_default=True, help="What a guest reboot does.")
@click.option("--sandbox", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Confine the running VMM (no_new_privs, Landlock, no capabilities, seccomp): "
                   "auto applies what the host supports, on fails if a part cannot be.")
@click.option("--verbose", "-v", is_flag=True, help="Say which accelerator is used and why.")
@click.pass_context
def run(ctx: click.Context, kernel: Path | None, initrd: Path | None, cmdline: str, cpus: int,
        memory: int, accel: str, console_spec: str, disks: tuple[str, ...], rng: bool,
        on_reboot: str, sandbox: str, verbose: bool) -> None:
    """Boot a VM in the foreground (the default guest when no --kernel is given).

    The serial console is on this terminal: Ctrl-A x quits. Commands piped
    into stdin run in the guest's shell. Exit status: 0 on guest power-off
    (or reboot with --on-reboot exit, or a stop by SIGINT/SIGTERM/SIGHUP/SIGQUIT
    while it runs), 1 if the guest crashed, 2 on bad input, 128 + N when
    signal N stops pyvirt before the guest first ran.
    """
    from pyvirt.vmm.config import VmConfig, parse_console, parse_disk
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
                       verbose=verbose, disks=tuple(parse_disk(d) for d in disks), rng=rng,
                       sandbox=sandbox)  # type: ignore[arg-type]
        return run_vm(cfg)

    sys.exit(_guarded(ctx, go))


@cli.group()
def guest() -> None:
    """The default guest (Debian kernel + our initramfs)."""


@guest.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when already built.")
@click.option("--rootfs", is_flag=True,
              help="Also build the Debian root filesystem image (ext4; needs root).")
@click.option("--size", type=_Size(), default=None,
              help="With --rootfs: the image size, e.g. 1G (default: the tree plus 512M).")
@click.pass_context
def guest_build(ctx: click.Context, force: bool, rootfs: bool, size: int | None) -> None:
    """Download the Debian kernel and busybox and write the initramfs.

    With --rootfs, also debootstrap Debian 12 (minbase, fio) into an ext4 image
    for root=/dev/vda.
    """
    from pyvirt.guest.build import build_default_guest

    if size is not None and not rootfs:
        raise click.UsageError("--size applies to the image --rootfs builds")

    def go() -> int:
        log: Callable[[str], None] = lambda s: click.echo(f"pyvirt: {s}", err=True)  # noqa: E731
        if rootfs:
            from pyvirt.guest.rootfs import check_size

            check_size(size)
        g = build_default_guest(force=force, log=log)
        click.echo(f"kernel: {g.kernel}\ninitrd: {g.initrd}")
        if rootfs:
            from pyvirt.guest.rootfs import build_rootfs

            image = build_rootfs(force=force, size=size, log=log)
            click.echo(f"rootfs: {image.path}")
        return 0

    sys.exit(_guarded(ctx, go))


def one_line(text: str) -> str:
    """``text`` with control characters escaped: an error quotes user input
    (paths, specs) and must stay one line on the terminal whatever it holds."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _guarded(ctx: click.Context, fn: Callable[[], int]) -> int:
    """Run ``fn``; turn pyvirt errors into one line on stderr and an exit status."""
    try:
        return int(fn())
    except PyvirtError as exc:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        click.echo(f"pyvirt: error: {one_line(str(exc))}", err=True)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


def main() -> None:
    cli(prog_name="pyvirt")

"""The ``pyvirt`` command line.

``pyvirt run`` boots one VM in the foreground; ``pyvirt guest build`` makes
the default guest. Bad input prints one line naming the problem and exits 2;
no tracebacks reach the user (``--debug`` shows them).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from pyvirt.errors import PyvirtError

if TYPE_CHECKING:
    from pyvirt.vmm.config import VmConfig
    from pyvirt.vmm.runner import ExitFile

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


class _LazyGroup(click.Group):
    """Subcommands in other modules (``ctl``) are imported only when used, so
    ``pyvirt run`` pays nothing for them at start-up."""

    _lazy = {"ctl": ("pyvirt.cli.ctl", "ctl"),
             "img": ("pyvirt.cli.img", "img"),  # disk images: qemu-img's verbs
             "daemon": ("pyvirt.manager.daemon", "daemon"),  # pyvirtd
             "user": ("pyvirt.cli.users", "user")}  # the web GUI's accounts

    def list_commands(self, ctx: click.Context) -> list[str]:
        from pyvirt.cli.virsh import VERBS

        return sorted({*super().list_commands(ctx), *self._lazy, *VERBS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            import importlib

            module, attr = self._lazy[cmd_name]
            cmd: click.Command = getattr(importlib.import_module(module), attr)
            return cmd
        found = super().get_command(ctx, cmd_name)
        if found is None:  # virsh's verbs against pyvirtd (cli/virsh.py)
            from pyvirt.cli import virsh

            if cmd_name in virsh.VERBS:
                verb: click.Command = getattr(virsh, virsh.VERBS[cmd_name])
                return verb
        return found


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show debug logs and tracebacks.")
@click.option("-c", "--connect", "uri", metavar="URI", envvar="PYVIRT_URI",
              help="The daemon the virsh verbs talk to: unix:///PATH, ssh://[USER@]HOST[/SOCK] "
                   "or https://HOST:PORT (default: $PYVIRT_URI, else the local daemon).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, uri: str | None) -> None:
    """pyvirt: run virtual machines on KVM or on a software CPU."""
    ctx.obj = {"debug": debug, "uri": uri}
    sub = ctx.invoked_subcommand or ""
    own = isinstance(ctx.command, click.Group) and \
        click.Group.get_command(ctx.command, ctx, sub) is not None  # run, guest
    if debug or own or sub in _LazyGroup._lazy:
        # the VMM, pyvirt img and the daemon log; the virsh verbs (one request to the
        # daemon) spare importing logging (~20 ms of `pyvirt list`'s 100) unless --debug
        import logging

        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="pyvirt: %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=True),
              metavar="FILE",
              help="Take the whole VM configuration from a JSON document (the format "
                   "--print-config writes; README: Configuration file). No other option "
                   "may be given with it, except --print-config.")
@click.option("--print-config", is_flag=True,
              help="Print the configuration as a JSON document and exit without booting.")
@click.option("--kernel", type=click.Path(path_type=Path, dir_okay=True),
              help="Linux bzImage or ELF vmlinux (default: the default guest's kernel).")
@click.option("--initrd", type=click.Path(path_type=Path, dir_okay=True),
              help="initramfs (default: the default guest's, when --kernel is not given).")
@click.option("--cmdline", default="", help="Extra kernel command line.")
@click.option("--cpus", type=int, default=1, show_default=True, help="Number of vCPUs.")
@click.option("--memory", "-m", metavar="SIZE", default="512M", show_default=True,
              help="Guest RAM, e.g. 512M or 2G (plain numbers are MiB).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "emu"]), default="auto",
              show_default=True, help="CPU backend: KVM, the software CPU, or pick.")
@click.option("--console", "console_spec", default="stdio", show_default=True,
              help="Console: stdio (serial ttyS0), virtio (hvc0 on this terminal), none "
                   "or file:PATH.")
@click.option("--disk", "disks", multiple=True, metavar="SPEC",
              help="A virtio-blk disk (repeatable; vda, vdb, ... in order): "
                   "path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID]"
                   "[,cache=none|writeback][,discard=on]. A writable image with a qcow2 "
                   "header needs format=qcow2.")
@click.option("--net", "nets", multiple=True, metavar="SPEC",
              help="A virtio-net NIC (repeatable; eth0, eth1, ... in order): user[,mac=MAC]"
                   "[,hostfwd=tcp::HOSTPORT-:GUESTPORT]... (user-mode networking through passt, "
                   "no privileges), tap=NAME[,mac=MAC][,bridge=BR] (a TAP, created if absent), "
                   "or none. Default: one user NIC.")
@click.option("--vsock", "vsock_spec", metavar="cid=N,path=PATH",
              help="virtio-vsock: the guest is CID N; host programs connect to the Unix socket "
                   "PATH and send 'CONNECT PORT\\n'; the guest's connections to host port P "
                   "reach the Unix socket PATH_P.")
@click.option("--name", metavar="NAME",
              help="The VM's name; its NICs' MAC addresses derive from it (stable across runs).")
@click.option("--rng/--no-rng", default=True, show_default=True,
              help="A virtio-rng device fed by the host's getrandom.")
@click.option("--on-reboot", type=click.Choice(["restart", "exit"]), default="restart",
              show_default=True, help="What a guest reboot does.")
@click.option("--sandbox", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Confine the running VMM (no_new_privs, Landlock, no capabilities, seccomp): "
                   "auto applies what the host supports, on fails if a part cannot be.")
@click.option("--verbose", "-v", is_flag=True, help="Say which accelerator is used and why.")
@click.option("--api-socket", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="Serve the control API (HTTP/JSON, docs/api.md) on this Unix socket "
                   "(created with mode 0600; `pyvirt ctl PATH ...` drives it).")
@click.option("--restore", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Restore the snapshot in DIR instead of booting (it holds the configuration; "
                   "only --console and --disk may replace its console and disk paths). The VM "
                   "starts paused unless --resume is given.")
@click.option("--resume", is_flag=True, help="With --restore: run the guest at once.")
@click.option("--exit-file", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH",
              help="When pyvirt ends, write there one JSON object saying how: outcome "
                   "(poweroff, reboot, stopped, crash or error), detail, exit_status, time, "
                   "boot_count (README: Run by a daemon). Created at start; empty if pyvirt "
                   "is killed.")
@click.option("--fd", "fds", multiple=True, metavar="PATH=N[,N2]|tap:IFNAME=N",
              help="Use the inherited open file descriptor N wherever PATH (a kernel, initrd "
                   "or disk image, or one of its backing files) would be opened, N2 being an "
                   "optional second one of the same file without O_DIRECT (qcow2 metadata "
                   "under cache=none); tap:IFNAME=N: the open TAP IFNAME (repeatable).")
@click.option("--snapshot-root", type=click.Path(path_type=Path, file_okay=False),
              metavar="DIR",
              help="Where snapshots may be written while the sandbox is on (default: the API "
                   "socket's directory).")
@click.pass_context
def run(ctx: click.Context, config_file: Path | None, print_config: bool, kernel: Path | None,
        initrd: Path | None, cmdline: str, cpus: int, memory: str, accel: str,
        console_spec: str, disks: tuple[str, ...], nets: tuple[str, ...],
        vsock_spec: str | None, name: str | None, rng: bool, on_reboot: str, sandbox: str,
        verbose: bool, api_socket: Path | None, restore: Path | None, resume: bool,
        exit_file: Path | None, fds: tuple[str, ...], snapshot_root: Path | None) -> None:
    """Boot a VM in the foreground (the default guest when no --kernel is given).

    The serial console is on this terminal: Ctrl-A x quits. Commands piped
    into stdin run in the guest's shell. Exit status: 0 on guest power-off
    (or reboot with --on-reboot exit, or a stop by SIGINT/SIGTERM/SIGHUP/SIGQUIT
    while it runs), 1 if the guest crashed, 2 on bad input, 128 + N when
    signal N stops pyvirt before the guest first ran.
    """
    from pyvirt.vmm.config import (
        ConfigError,
        VmConfig,
        parse_console,
        parse_disk,
        parse_net,
        parse_size,
        parse_vsock,
    )

    # where each configuration field came from on this command line: an error
    # naming the field is shown with the flag and the text the user typed
    flags: dict[str, tuple[str, str]] = {}
    describe: Callable[[PyvirtError], str] = str

    def explicit(*names: str) -> list[str]:
        return [p.opts[0] for p in ctx.command.params if p.name in names
                and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]

    exit_record: list[ExitFile] = []  # created first thing: set-up errors go there too

    def go() -> int:
        nonlocal describe
        from pyvirt.vmm.runner import ExitFile, RunOptions

        if exit_file is not None:
            try:
                exit_record.append(ExitFile.create(exit_file))
            except ConfigError as exc:
                raise ConfigError(f"--exit-file {exc.detail}") from None
        for spec in fds:
            _hand_fd(spec)
        ef = exit_record[0] if exit_record else None
        if resume and restore is None:
            raise ConfigError("--resume: only with --restore")
        if restore is not None:
            if config_file is not None or print_config:
                raise ConfigError("--restore: the snapshot holds the configuration; "
                                  "--config and --print-config cannot be given with it")
            given = explicit(*(set(_RUN_FIELDS) - {"console_spec", "disks", "nets", "verbose"}))
            if given:
                raise ConfigError(f"--restore: {', '.join(given)} cannot be given with it "
                                  "(the snapshot holds the configuration)")
            from pyvirt.vmm.snapshot import read_snapshot

            overrides: dict[str, object] = {}
            if explicit("console_spec"):
                overrides["console"] = parse_console(console_spec).to_dict()
                flags["console"] = ("--console", console_spec)
            if disks:
                overrides["disks"] = [parse_disk(x).to_dict() for x in disks]
                flags.update({f"disks[{n}]": ("--disk", d) for n, d in enumerate(disks)})
            if nets:  # the daemon's TAPs are new at each start: same NICs, new names
                overrides["nics"] = [n.to_dict() for n in map(parse_net, nets) if n is not None]
                flags.update({f"nics[{n}]": ("--net", x) for n, x in enumerate(nets)})
            describe = functools.partial(_as_flags, flags)
            snap = read_snapshot(restore, overrides=overrides)
            cfg = snap.config
            if verbose:
                import dataclasses

                cfg = dataclasses.replace(cfg, verbose=True)
            from pyvirt.vmm.runner import run_vm

            try:
                return run_vm(cfg, options=RunOptions(api_socket=api_socket, restore=snap,
                                                      start=resume, exit_file=ef,
                                                      snapshot_root=snapshot_root))
            finally:
                snap.close()
        if config_file is not None:
            given = [p.opts[0] for p in ctx.command.params if p.name in _RUN_FIELDS
                     and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
            if given:
                raise ConfigError(f"--config: {', '.join(given)} cannot be given with it "
                                  "(the file holds the whole configuration)")
            cfg = _load_config(config_file)
            describe = functools.partial(_in_file, str(config_file))
        else:
            k, i = kernel, initrd
            if k is None:
                from pyvirt.guest.build import build_default_guest, default_guest, guest_is_built

                if not print_config and not guest_is_built():
                    build_default_guest(log=lambda s: click.echo(f"pyvirt: {s}", err=True))
                g = default_guest()
                k = g.kernel
                i = i if i is not None else g.initrd
            else:
                flags["kernel"] = ("--kernel", str(kernel))
            if initrd is not None:
                flags["initrd"] = ("--initrd", str(initrd))
            flags.update(cpus=("--cpus", str(cpus)), memory=("--memory", memory),
                         accel=("--accel", accel), console=("--console", console_spec),
                         on_reboot=("--on-reboot", on_reboot), sandbox=("--sandbox", sandbox))
            flags.update({f"disks[{n}]": ("--disk", d) for n, d in enumerate(disks)})
            # no --net: one user-mode NIC, as QEMU gives; --net none (alone) gives none
            if nets and "none" in nets and len(nets) > 1:
                raise ConfigError("--net none: cannot be given with other --net options")
            specs = nets or ("user",)
            nics = tuple(n for n in (parse_net(x) for x in specs) if n is not None)
            shown = nets or ("user (the default; --net none for no network)",)
            flags.update({f"nics[{n}]": ("--net", x) for n, x in enumerate(shown)})
            if vsock_spec is not None:
                flags["vsock"] = ("--vsock", vsock_spec)
            if name is not None:
                flags["name"] = ("--name", name)
            describe = functools.partial(_as_flags, flags)
            cfg = VmConfig(kernel=k, initrd=i, cmdline=cmdline, cpus=cpus,
                           memory=parse_size(memory),
                           accel=accel,  # type: ignore[arg-type]
                           console=parse_console(console_spec),
                           on_reboot=on_reboot,  # type: ignore[arg-type]
                           verbose=verbose, disks=tuple(parse_disk(d) for d in disks), rng=rng,
                           sandbox=sandbox,  # type: ignore[arg-type]
                           name=name, nics=nics,
                           vsock=None if vsock_spec is None else parse_vsock(vsock_spec))
        if print_config:
            click.echo(cfg.to_json())
            return 0
        from pyvirt.vmm.runner import run_vm

        return run_vm(cfg, options=RunOptions(api_socket=api_socket, exit_file=ef,
                                              snapshot_root=snapshot_root))

    def recorded() -> int:
        try:
            status = go()
            if exit_record:  # --print-config: nothing ran
                exit_record[0].write("stopped", "configuration printed", status, 0)
            return status
        except PyvirtError as exc:
            if exit_record:  # run_vm wrote it already when the error came from there
                exit_record[0].write("error", describe(exc), exc.exit_status, 0)
            raise
        finally:
            for record in exit_record:
                record.close()

    sys.exit(_guarded(ctx, recorded, lambda exc: describe(exc)))


def _hand_fd(spec: str) -> None:
    """``--fd PATH=N[,N2]`` or ``--fd tap:IFNAME=N``: record the inherited fds
    (``pyvirt.hostfile.handed``)."""
    from pyvirt.hostfile import hand, hand_tap
    from pyvirt.vmm.config import ConfigError

    name, sep, numbers = spec.rpartition("=")
    parts = numbers.split(",")
    if not sep or not name or not 1 <= len(parts) <= 2 or not all(
            p.isdigit() and len(p) < 10 for p in parts):
        raise ConfigError(f"--fd {spec!r}: expected PATH=N[,N2] or tap:IFNAME=N "
                          "(N an open file descriptor)")
    nums = [int(p) for p in parts]
    if any(n < 3 for n in nums):
        raise ConfigError(f"--fd {spec}: fd {min(nums)} is stdin, stdout or stderr")
    if name.startswith("tap:"):
        if len(nums) != 1:
            raise ConfigError(f"--fd {spec}: a TAP takes one fd")
        hand_tap(name[4:], nums[0], error=ConfigError, what=f"--fd {spec}")
        return
    hand(Path(name), nums[0], nums[1] if len(nums) > 1 else None, error=ConfigError,
         what=f"--fd {spec}")


#: the options of ``run`` that are configuration fields (refused with --config)
_RUN_FIELDS = ("kernel", "initrd", "cmdline", "cpus", "memory", "accel", "console_spec", "disks",
               "nets", "vsock_spec", "name", "rng", "on_reboot", "sandbox", "verbose")

#: an error message that starts with a configuration field's path (errors below
#: the CLI name fields, never flags: see pyvirt.vmm.config)
_FIELD_RE = re.compile(r"(kernel|initrd|cmdline|cpus|memory|accel|console(?:\.\w+)?|on_reboot"
                       r"|verbose|rng|sandbox|name|vsock(?:\.\w+)?"
                       r"|(?:disks|nics)(?:\[\d+\](?:\.\w+(?:\[\d+\])?)?)?): (.*)", re.S)
_DISK_FIELD_RE = re.compile(r"\bdisks\[(\d+)\](?:\.path)?")


def _field_of(exc: PyvirtError) -> tuple[str, str] | None:
    """(field path, the rest of the message) when ``exc`` is about one field."""
    from pyvirt.vmm.config import ConfigError

    if isinstance(exc, ConfigError) and exc.field:
        return exc.field, exc.detail
    m = _FIELD_RE.fullmatch(str(exc))
    return (m.group(1), m.group(2)) if m else None


def _as_flags(flags: dict[str, tuple[str, str]], exc: PyvirtError) -> str:
    """The message of ``exc`` with the field it names shown as the flag that set it:
    ``disks[1].path: x.img: no such file`` -> ``--disk path=x.img: x.img: no such file``."""
    found = _field_of(exc)
    if found is None:
        return str(exc)
    path, detail = found
    root = path.split(".", 1)[0]
    if root not in flags:
        return str(exc)
    flag, text = flags[root]

    def other_disk(m: re.Match[str]) -> str:
        given = flags.get(f"disks[{m.group(1)}]")
        return f"{given[0]} {given[1]}" if given else m.group(0)

    detail = _DISK_FIELD_RE.sub(other_disk, detail)
    if detail.startswith((f"{text}: ", f"{text} ")):  # the message quotes the value already
        return f"{flag} {detail}"
    return f"{flag} {text}: {detail}"


def _in_file(name: str, exc: PyvirtError) -> str:
    """An error about a field of the configuration file ``name`` names the file too."""
    return f"{name}: {exc}" if _field_of(exc) is not None else str(exc)


def _load_config(path: Path) -> VmConfig:
    """The document in ``path``, validated (values only: the host checks come with
    the run); every error names the file, and the field where there is one."""
    from pyvirt.hostfile import open_host_file
    from pyvirt.vmm.config import MAX_DOCUMENT, ConfigError, VmConfig

    try:
        fd, _ = open_host_file(path, os.O_RDONLY, what="--config", error=ConfigError)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--config: ", "--config ", 1)) from None
    try:
        chunks = []
        size = 0
        while size <= MAX_DOCUMENT:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return VmConfig.from_json(b"".join(chunks))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


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


def _guarded(ctx: click.Context, fn: Callable[[], int],
             describe: Callable[[PyvirtError], str] = str) -> int:
    """Run ``fn``; turn pyvirt errors into one line on stderr (``describe``
    words it) and an exit status."""
    try:
        return int(fn())
    except PyvirtError as exc:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        click.echo(f"pyvirt: error: {one_line(describe(exc))}", err=True)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


def main() -> None:
    cli(prog_name="pyvirt")

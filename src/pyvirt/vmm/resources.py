"""What a VM holds from its start to its end, across guest reboots.

``VmResources`` opens the host files a VM uses once, before the first boot,
and closes them when the VM ends (``run_vm`` owns it; a context manager):

- the kernel and initrd: opened without blocking, checked to be regular files,
  read again from the same open file at each boot;
- the disk images: opened and locked with their backing chains
  (``open_disk``); a guest reboot rebuilds the machine but not its disks, so
  the locks are never released while the VM lives; the same file under two
  names is refused by device and inode, across all the disks' chains, except
  a file every use of which is read-only (two overlays over one base image);
- the NICs' host sides (``NetBackend``): a TAP opened (or created, and put on
  its bridge) or a passt process started, once: a guest reboot keeps them;
- the vsock's listening Unix socket, bound before the sandbox closes the
  file system (the device connects to ``PATH_PORT`` sockets at run time);
- the console: its output file is created or truncated (or its socket
  bound: ``SocketConsole``) only by ``start()``, once every input has been
  checked, before the sandbox.

A file handed by the caller (``pyvirt run --fd``, ``pyvirt.hostfile.handed``)
is not opened by path: ``open_host_file`` hands out a duplicate of its fd.

Order of opening: kernel, initrd, disks (locked), NICs, the vsock socket,
then (``start``) the console; a failure closes what was opened and leaves no
file written (a vsock socket file we bound is removed again).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pyvirt.hostfile import FileIdentity, open_host_file
from pyvirt.loader.errors import LoaderError
from pyvirt.vmm.config import NicSpec, VmConfig
from pyvirt.vmm.console import Console, make_console

if TYPE_CHECKING:  # virtio-blk and the network are imported only for VMs that have them
    from pyvirt.disk.backend import DiskBackend
    from pyvirt.net.backend import NetBackend

__all__ = ["BootFile", "VmResources"]


@dataclass
class BootFile:
    """The kernel or the initrd: an open regular file, read whole at each boot."""

    path: Path
    fd: int
    what: str  # the config field: "kernel" or "initrd"

    @classmethod
    def open(cls, path: Path, what: str) -> BootFile:
        fd, _ = open_host_file(path, os.O_RDONLY, what=what, error=LoaderError)
        return cls(path, fd, what)

    def read(self, limit: int) -> bytes:
        """The whole file; more than ``limit`` bytes (the guest's RAM: it could not
        be loaded) is refused before anything is read."""
        size = os.fstat(self.fd).st_size
        if size > limit:
            raise LoaderError(f"{self.what} of {size} bytes is larger than the guest's RAM",
                              self.path)
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(self.fd, min(size - offset, 1 << 24), offset)
            if not chunk:
                break  # truncated meanwhile: the loader judges what is there
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class VmResources:
    config: VmConfig
    console: Console
    kernel: BootFile | None = None
    initrd: BootFile | None = None
    disks: list[DiskBackend] = field(default_factory=list)
    nics: list[NetBackend] = field(default_factory=list)
    vsock_listener: socket.socket | None = None
    started: bool = False

    @classmethod
    def open(cls, config: VmConfig, *, console: Console | None = None) -> VmResources:
        """Open everything ``config`` names (see the module docstring); raises a
        ``UserInputError`` naming the config field (``disks[1].path``) on bad input."""
        res = cls(config, console if console is not None else make_console(config.console))
        try:
            res.kernel = BootFile.open(config.kernel, "kernel")
            if config.initrd is not None:
                res.initrd = BootFile.open(config.initrd, "initrd")
            if config.disks:
                res._open_disks()
            for i, nic in enumerate(config.nics):
                res.nics.append(_open_nic(nic, f"nics[{i}]"))
            if config.vsock is not None:
                from pyvirt.virtio.vsock import bind_listener

                res.vsock_listener = bind_listener(config.vsock.path, "vsock.path")
        except BaseException:
            res.close()
            raise
        return res

    def _open_disks(self) -> None:
        from pyvirt.disk.backend import SECTOR, DiskError
        from pyvirt.disk.open import open_disk

        taken: dict[FileIdentity, str] = {}  # every file of every chain: its name
        shared: set[FileIdentity] = set()  # those whose every use is read-only
        for i, spec in enumerate(self.config.disks):
            what = f"disks[{i}].path"
            disk = open_disk(spec.path, format=spec.format, readonly=spec.readonly,
                             direct=spec.cache == "none", what=what, others=taken,
                             allow_self_shared=shared)
            self.disks.append(disk)
            if disk.size < SECTOR:
                raise DiskError(f"{what}: {spec.path}: image is smaller than one 512-byte sector")
            for depth, layer in enumerate(disk.chain()):
                if layer.identity not in taken:
                    taken[layer.identity] = (f"{what} ({spec.path})" if depth == 0 else
                                             f"a backing file of {what} ({layer.path})")
                if layer.readonly:
                    shared.add(layer.identity)
                else:
                    shared.discard(layer.identity)

    def start(self) -> None:
        """All set-up is done and checked: create the console's output file and
        take the terminal. Once, just before the guest first runs."""
        if not self.started:
            self.console.open()
            self.started = True

    def close(self) -> None:
        """Give everything back (idempotent): the terminal first, then the files."""
        self.console.close()
        for disk in self.disks:
            disk.close()
        self.disks.clear()
        for nic in self.nics:
            nic.close()
        self.nics.clear()
        if self.vsock_listener is not None:
            self.vsock_listener.close()
            self.vsock_listener = None
            if self.config.vsock is not None:  # ours: bound by bind_listener for this VM
                with contextlib.suppress(OSError):
                    os.unlink(self.config.vsock.path)
        for f in (self.kernel, self.initrd):
            if f is not None:
                f.close()

    def __enter__(self) -> VmResources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_nic(nic: NicSpec, what: str) -> NetBackend:
    """The host side of one NIC; errors name ``what`` (``nics[0]``)."""
    if nic.kind == "tap":
        from pyvirt.net.tap import open_tap

        assert nic.tap is not None
        return open_tap(nic.tap, create=True, bridge=nic.bridge, what=what)
    from pyvirt.net.passt import HostForward, start_passt

    return start_passt(hostfwd=[HostForward(f.proto, f.host_addr, f.host_port, f.guest_port)
                                for f in nic.hostfwd], what=what)

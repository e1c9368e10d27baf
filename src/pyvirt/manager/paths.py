"""Where the daemon keeps things: its state (the database, each VM's directory,
managed saves, snapshots, the default pool) and its run-time files (sockets,
pid files). Run-time paths are short: a Unix socket's path must fit in 107
bytes, so a VM's run directory is named by the first 8 hex digits of its UUID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DaemonPaths"]


@dataclass(frozen=True)
class DaemonPaths:
    #: persistent state: /var/lib/pyvirt for root
    state: Path
    #: run-time files: /run/pyvirt for root
    run: Path

    @classmethod
    def for_root(cls, root: Path) -> DaemonPaths:
        """Everything beneath one directory (tests, unprivileged daemons): ROOT/state, ROOT/run."""
        root = Path(os.path.abspath(root))
        return cls(state=root / "state", run=root / "run")

    @classmethod
    def default(cls) -> DaemonPaths:
        """root: /var/lib/pyvirt and /run/pyvirt; another user: $XDG_DATA_HOME/pyvirt
        (~/.local/share/pyvirt) and $XDG_RUNTIME_DIR/pyvirt (else /tmp/pyvirt-UID)."""
        if os.geteuid() == 0:
            return cls(state=Path("/var/lib/pyvirt"), run=Path("/run/pyvirt"))
        data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        run = Path(runtime) / "pyvirt" if runtime else Path(f"/tmp/pyvirt-{os.geteuid()}")
        return cls(state=Path(data) / "pyvirt", run=run)

    @property
    def db(self) -> Path:
        return self.state / "pyvirt.db"

    @property
    def socket(self) -> Path:
        """The management API's Unix socket."""
        return self.run / "pyvirtd.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "pyvirtd.pid"

    def vm_dir(self, uuid: str) -> Path:
        """A VM's persistent directory: snapshots, managed save, overlays, vmm.log
        (the VMM's snapshot root)."""
        return self.state / "vms" / uuid

    def vm_run(self, uuid: str) -> Path:
        """A VM's run-time directory: api.sock, console.sock, exit.json, config.json."""
        return self.run / "vm" / uuid.replace("-", "")[:8]

    def pool_default(self) -> Path:
        return self.state / "images"

    def net_run(self, name: str) -> Path:
        return self.run / "net" / name

    def ensure(self) -> None:
        """Create the directories (state 0711, run 0711: VMs' own dirs below
        are owned by whoever runs them)."""
        for d, mode in ((self.state, 0o711), (self.run, 0o711), (self.state / "vms", 0o711),
                        (self.run / "vm", 0o711), (self.run / "net", 0o755)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)

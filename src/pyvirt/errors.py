"""The root of pyvirt's error tree.

    PyvirtError
    ├── ConfigError            (pyvirt.vmm.config)   a configuration field (.field), value or host
    ├── GuestMemoryError       (pyvirt.memory)       a guest address/length outside RAM
    ├── LoaderError            (pyvirt.loader)       kernel/initrd/cmdline cannot be used
    ├── KvmError               (pyvirt.kvm)          an ioctl on /dev/kvm failed
    ├── HypervisorError        (pyvirt.hypervisor)   no usable CPU backend
    └── GuestBuildError        (pyvirt.guest)        the default guest cannot be built

Every error says what failed in words a user understands; the CLI prints
``str(err)`` on one line and exits 2 (user input) or 1 (runtime failure).
"""

from __future__ import annotations


class PyvirtError(Exception):
    """Base of every error pyvirt raises on purpose."""

    #: process exit status the CLI uses for this error
    exit_status: int = 1


class UserInputError(PyvirtError):
    """The user handed us something unusable (a flag, a file): exit status 2."""

    exit_status = 2

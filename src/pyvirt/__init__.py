"""pyvirt: a KVM virtualization stack written in Python.

Layers (bottom up): kvm, hypervisor, memory, loader, arch.x86_64, devices,
vmm, cli. See docs/design.md.
"""

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> object:
    # the client is imported on first use: ``import pyvirt`` stays cheap for the VMM
    if name == "Client":
        from pyvirt.client import Client

        return Client
    raise AttributeError(f"module 'pyvirt' has no attribute {name!r}")

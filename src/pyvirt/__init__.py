"""pyvirt: a KVM virtualization stack written in Python.

Layers (bottom up): kvm, hypervisor, memory, loader, arch.x86_64, devices,
vmm, cli. See docs/design.md.
"""

__version__ = "0.1.0"

"""pyvirt.vmm."""

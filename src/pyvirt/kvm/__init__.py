"""pyvirt.kvm."""

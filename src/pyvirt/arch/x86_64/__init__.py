"""pyvirt.arch.x86_64."""

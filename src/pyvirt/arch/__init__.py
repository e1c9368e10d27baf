"""pyvirt.arch."""

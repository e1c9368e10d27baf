"""pyvirt.loader."""

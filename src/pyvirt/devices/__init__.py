"""pyvirt.devices."""

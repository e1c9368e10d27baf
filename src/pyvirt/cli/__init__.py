"""pyvirt.cli."""

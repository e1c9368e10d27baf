"""pyvirt.devices.legacy."""

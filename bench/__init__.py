"""Benchmarks: pyvirt side by side with C and QEMU (``make bench``). Not tests."""

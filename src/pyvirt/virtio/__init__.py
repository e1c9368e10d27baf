"""virtio 1.2 devices over the modern PCI transport.

- ``queue``: the split virtqueue (2.7), with indirect descriptors and
  ``VIRTIO_RING_F_EVENT_IDX``; every index, address and length the driver
  gives is checked before use.
- ``device``: what a device type implements (features, config space, queue
  work, saved state) and ``QueueWorker``, which runs that work on the VMM's
  shared event loop when the queues' eventfds fire.
- ``pci``: the virtio-over-PCI transport (4.1): capabilities, common config,
  ISR, notifications (ioeventfd under KVM), MSI-X or INTx interrupts.
- ``blk``, ``rng``, ``console``: the device types.
"""

from __future__ import annotations

__all__ = [
    "DEVICE_ID_BLOCK",
    "DEVICE_ID_CONSOLE",
    "DEVICE_ID_NET",
    "DEVICE_ID_RNG",
    "DEVICE_ID_VSOCK",
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "F_VERSION_1",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DEVICE_NEEDS_RESET",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
]

# Device status bits (2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Reserved feature bits (6)
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32

# Device IDs (5)
DEVICE_ID_NET = 1
DEVICE_ID_BLOCK = 2
DEVICE_ID_CONSOLE = 3
DEVICE_ID_RNG = 4
DEVICE_ID_VSOCK = 19

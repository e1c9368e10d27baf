"""Host-side networking for the VM's NICs and its vsock.

- ``backend``: what a NIC's host side is (``NetBackend``): the virtio-net
  device moves frames to and from it and never knows which one it holds.
- ``tap``: a TAP device (existing, or created and optionally put on a
  bridge through netlink), frames with a virtio-net header so checksum and
  segmentation offloads cross the host untouched.
- ``passt``: user-mode networking with no privileges: a ``passt`` process on
  one end of a socket pair (QEMU's stream framing).
- ``mac``: stable MAC addresses derived from the VM's identity.
"""

from __future__ import annotations

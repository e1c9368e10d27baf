"""virtio-vsock (``VsockDevice``) behind the real virtio-pci transport, against real host
Unix sockets (the listener, two ports that listen but never accept, the rest with nobody
there): fuzzer-chosen rings (``VirtioHarness``), then well-formed chains carrying
fuzzer-chosen packet headers and payloads (a hostile guest's vsock transport), and host
clients sending fuzzer-chosen CONNECT lines.

Documented outcomes: bad packets answered with RST or ignored, bounds kept (live
connections, RST replies waiting for rx buffers, bytes buffered per connection,
handshakes), bad chains completed with 0, ``QueueBroken`` → NEEDS_RESET."""

from __future__ import annotations

import atexit
import contextlib
import select
import shutil
import socket
import tempfile
from pathlib import Path

from fuzz.common import HIGH, Provider, VirtioHarness, check, check_used
from pyvirt.virtio import STATUS_FEATURES_OK
from pyvirt.virtio.device import QueueWorker
from pyvirt.virtio.queue import Chain
from pyvirt.virtio.vsock import (
    BUF_ALLOC,
    HDR,
    MAX_CONNECTIONS,
    MAX_HANDSHAKES,
    MAX_STRAY,
    VsockDevice,
    bind_listener,
)

MAX_LEN = 8192
CID = 3
_PKT = HIGH[0] + 0x10000  # where the structured packets are written

_dir = Path(tempfile.mkdtemp(prefix="pyvirt-fuzz-vsock-"))
atexit.register(shutil.rmtree, _dir, True)
_uds = _dir / "v.sock"
_listener = bind_listener(_uds, "vsock.path")
_servers = []
for _port in (1, 2):
    _s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    _s.bind(f"{_uds}_{_port}")
    _s.listen(8)
    _servers.append(_s)
_vsock = VsockDevice(guest_cid=CID, listener=_listener, uds_path=_uds)
_harness = VirtioHarness(_vsock)


def _pick(fdp: Provider, common: tuple[int, ...], width: int) -> int:
    """Mostly one of ``common``, sometimes anything of ``width`` bytes."""
    k = fdp.ConsumeIntInRange(0, len(common))
    return common[k] if k < len(common) else fdp.ConsumeUInt(width)


def _header(fdp: Provider, payload_len: int) -> bytes:
    return HDR.pack(
        _pick(fdp, (CID, CID, CID, 2, 0), 8),  # src_cid
        _pick(fdp, (2, 2, 2, CID), 8),  # dst_cid
        _pick(fdp, (1000, 1001, 1 << 30), 4),  # src_port
        _pick(fdp, (1, 2, 3, 1 << 30), 4),  # dst_port: listening, listening, nobody
        _pick(fdp, (payload_len, payload_len, 0, 1 << 16), 4),  # len
        _pick(fdp, (1, 1, 1, 2), 2),  # type
        _pick(fdp, (1, 2, 3, 4, 5, 5, 5, 6, 7, 0, 8), 2),  # op
        fdp.ConsumeUInt(4),  # flags
        _pick(fdp, (BUF_ALLOC, 4096, 0), 4),  # buf_alloc
        _pick(fdp, (0, 10, 100), 4))  # fwd_cnt


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    h = _harness
    queues = h.set_up(fdp)  # resets the device first: what the last input opened closes
    if not h.pci.status & STATUS_FEATURES_OK:
        return
    # what DRIVER_OK does, without starting the loop: the device watches its fds
    worker = QueueWorker("fuzz-io", _vsock, h.pci.queues, h.pci.notify_fds, h.pci.needs_reset)
    h.pci._worker = worker
    clients: list[socket.socket] = []
    try:
        _vsock.activate(h.pci, h.pci.queues, h.pci.driver_features)
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            c.connect(str(_uds))
            with contextlib.suppress(OSError):
                c.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
            clients.append(c)
        worker.call(lambda: _vsock._on_listener(select.EPOLLIN))
        for hs in list(_vsock._handshakes.values()):
            worker.call(lambda hs=hs: _vsock._on_line(hs))  # type: ignore[misc]
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
            h.mem.write(_PKT, _header(fdp, len(payload)) + payload)
            chain = Chain(0, [(_PKT, HDR.size)]
                          + ([(_PKT + HDR.size, len(payload))] if payload else []))
            worker.call(lambda chain=chain: _vsock._packet(h.pci, chain))  # type: ignore[misc]
        for q in queues:
            before = q.used_idx
            worker._process(q)
            check_used(h.mem, q, before)
        check(len(_vsock._conns) <= MAX_CONNECTIONS, "connections over their bound")
        check(len(_vsock._stray) <= MAX_STRAY, "RST replies over their bound")
        check(len(_vsock._handshakes) <= MAX_HANDSHAKES, "handshakes over their bound")
        check(all(len(c.txbuf) <= BUF_ALLOC for c in _vsock._conns.values()),
              "a connection buffers more than its credit")
    finally:
        for c in clients:
            c.close()
        for s in _servers:  # empty the backlogs: the next input may connect again
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.accept()[0].close()

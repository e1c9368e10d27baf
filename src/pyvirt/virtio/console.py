"""virtio-console (virtio 1.2, 5.3): one port, the guest's ``hvc0``.

Queue 0 (receiveq) carries input to the guest, queue 1 (transmitq) its
output; with ``VIRTIO_CONSOLE_F_MULTIPORT`` queues 2 and 3 are the control
receiveq/transmitq (5.3.2). Input from the user is buffered here (up to
``INPUT_LIMIT`` bytes; ``enqueue_input`` says how much it took, like the
serial port) and handed to the event loop through an eventfd; the device's
handler there copies it into whatever receive buffers the driver has posted.

When input may go out: only once the driver says port 0 is open. Linux's
driver (drivers/char/virtio_console.c, v6.1) posts its receive buffers in
``add_port()`` before the port is on its list, and ``in_intr()`` frees the
buffers of a queue whose port it cannot find (``flush_bufs``): input sent as
soon as buffers appear was dropped whole. We therefore offer MULTIPORT, as
QEMU's virtio-serial does, and run its control handshake (5.3.6.2): the
driver's DEVICE_READY is answered with PORT_ADD for port 0, its PORT_READY
with CONSOLE_PORT and PORT_OPEN; its own PORT_OPEN, sent by
``init_port_console()`` once the port is listed and its hvc exists, releases
the input. Replies go on the control receiveq *before* the driver's control
message is completed, because the driver busy-waits for that completion and
then reads the replies in the same pass. A driver that does not negotiate
MULTIPORT gets input as soon as it posts buffers (it has no way to say more).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.guestlog import guest_faults
from pyvirt.virtio import DEVICE_ID_CONSOLE
from pyvirt.virtio.device import (
    Completions,
    Transport,
    VirtioDevice,
    copy_from_chain,
    copy_to_chain,
    next_chain,
    serve_queue,
)
from pyvirt.virtio.queue import Chain, SplitQueue

__all__ = ["F_MULTIPORT", "INPUT_LIMIT", "ConsoleDevice", "ConsoleState"]

log = logging.getLogger(__name__)

INPUT_LIMIT = 64 << 10
RX, TX, CTRL_RX, CTRL_TX = 0, 1, 2, 3

F_MULTIPORT = 1  # VIRTIO_CONSOLE_F_MULTIPORT

# struct virtio_console_control (5.3.6.2): le32 id, le16 event, le16 value
_CONTROL = struct.Struct("<IHH")
DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY, CONSOLE_PORT, RESIZE, PORT_OPEN, \
    PORT_NAME = range(8)
#: replies waiting for control receive buffers; each answers one driver message, so a
#: driver that sends messages but posts no buffers could grow it without this bound
_CONTROL_BACKLOG = 32


@dataclass(frozen=True)
class ConsoleState:
    """virtio-console: the MULTIPORT handshake's progress (port 0 opened by the
    driver, control replies waiting for buffers) and the input not yet handed
    to the guest."""

    version: int
    port_open: bool
    replies: tuple[bytes, ...]
    backlog_full: bool
    pending_input: bytes


class ConsoleDevice(VirtioDevice):
    device_id = DEVICE_ID_CONSOLE
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[ConsoleState]] = ConsoleState
    name = "virtio-console"
    pci_class = 0x078000  # communication controller, other
    features = 1 << F_MULTIPORT

    def __init__(self, write: Callable[[bytes], None]) -> None:
        super().__init__([64, 64, 32, 32])
        self._write = write
        self._input = bytearray()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._rx: SplitQueue | None = None
        self._ctrl_rx: SplitQueue | None = None
        # the loop thread only (and reset/restore, with the queue work stopped):
        self._multiport = False
        self._port_open = False  # the driver opened port 0: input may go out
        self._replies: deque[bytes] = deque()
        self._backlog_full = False
        self.tx_bytes = 0  # guest output
        self.rx_bytes = 0  # input handed to the guest

    def config_space(self) -> bytes:
        return struct.pack("<HHII", 0, 0, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def enqueue_input(self, data: bytes) -> int:
        """Buffer user input for the guest (any thread); returns bytes accepted."""
        with self._lock:
            n = max(0, min(len(data), INPUT_LIMIT - len(self._input)))
            self._input += data[:n]
        if n:
            os.eventfd_write(self._wake, 1)
        return n

    def activate(self, transport: object, queues: object, driver_features: int) -> None:
        super().activate(transport, queues, driver_features)  # type: ignore[arg-type]
        self._rx = queues[RX]  # type: ignore[index]
        self._multiport = bool(driver_features >> F_MULTIPORT & 1)
        self._ctrl_rx = queues[CTRL_RX] if self._multiport else None  # type: ignore[index]
        self._port_open = not self._multiport

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._wake, self._on_wake)]

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        if self._rx is not None and self._rx.ready:
            self._fill_rx(self._rx)

    def process(self, q: SplitQueue) -> None:
        if q.index == RX:
            self._fill_rx(q)
        elif q.index == TX:
            self._drain_tx(q)
        elif not self._multiport:
            return  # control queues exist only with MULTIPORT
        elif q.index == CTRL_RX:
            self._send_replies()
        elif q.index == CTRL_TX:
            transport = self.transport
            if transport is not None:
                serve_queue(transport, q, self.name, lambda chain: self._control(transport, chain))

    def _drain_tx(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is not None:
            serve_queue(transport, q, self.name, lambda chain: self._output(transport, chain))

    def _output(self, transport: Transport, chain: Chain) -> int:
        data = copy_from_chain(transport.memory, chain, limit=1 << 20)
        if data:
            self.tx_bytes += len(data)
            self._write(data)
        return 0

    # -- the control queues (MULTIPORT) ----------------------------------------

    def _control(self, transport: Transport, chain: Chain) -> int:
        """One message from the driver (control transmitq); replies are sent before
        the chain completes (see the module docstring)."""
        raw = copy_from_chain(transport.memory, chain, limit=_CONTROL.size)
        if len(raw) < _CONTROL.size:
            log.debug("%s: short control message (%d bytes)", self.name, len(raw))
            return 0
        port, event, value = _CONTROL.unpack(raw)
        if event == DEVICE_READY:
            if value:
                self._reply(0, DEVICE_ADD, 1)
        elif port != 0:
            log.debug("%s: control event %d for port %d, which does not exist",
                      self.name, event, port)
        elif event == PORT_READY:
            if value:  # the driver added port 0: it is the console, and we are connected
                self._reply(0, CONSOLE_PORT, 1)
                self._reply(0, PORT_OPEN, 1)
        elif event == PORT_OPEN:
            self._port_open = bool(value)
            if self._port_open and self._rx is not None and self._rx.ready:
                self._fill_rx(self._rx)
        self._send_replies()
        return 0

    def _reply(self, port: int, event: int, value: int) -> None:
        if len(self._replies) >= _CONTROL_BACKLOG:
            if not self._backlog_full:  # once per episode, within the device's budget
                guest_faults.warning(log, self.name, "%s: driver posts no control buffers; "
                                     "control events dropped", self.name)
                self._backlog_full = True
            return
        self._replies.append(_CONTROL.pack(port, event, value))

    def _send_replies(self) -> None:
        q, transport = self._ctrl_rx, self.transport
        if q is None or transport is None or not q.ready:
            return
        out = Completions(transport, q)
        while self._replies and (chain := next_chain(q, self.name, out)) is not None:
            msg = self._replies[0]
            if chain.writable_len < len(msg):
                guest_faults.warning(log, self.name, "%s: control buffer of %d bytes is too "
                                     "small", self.name, chain.writable_len)
                out.add(chain.head, 0)
                continue
            self._replies.popleft()
            self._backlog_full = False
            n = copy_to_chain(transport.memory, chain, msg)
            for addr, length in chain.writable:
                transport.note_dma_write(addr, length)
            out.add(chain.head, n)
        out.flush()

    # -- input -----------------------------------------------------------------

    def _fill_rx(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is None or not self._port_open:
            return  # held until the driver opens the port (see the module docstring)
        out = Completions(transport, q)
        while True:
            with self._lock:
                if not self._input:
                    break
            chain = next_chain(q, self.name, out)
            if chain is None:
                break
            with self._lock:
                n = copy_to_chain(transport.memory, chain, self._input[:chain.writable_len])
                del self._input[:n]
            self.rx_bytes += n
            for addr, length in chain.writable:
                transport.note_dma_write(addr, length)
            out.add(chain.head, n)
        out.flush()

    def reset(self) -> None:
        super().reset()
        self._rx = self._ctrl_rx = None
        self._multiport = self._port_open = False
        self._backlog_full = False
        self._replies.clear()  # input stays: it was typed for whatever driver comes next

    # -- saved state and metrics ------------------------------------------------

    def save_state(self) -> ConsoleState:
        with self._lock:
            pending = bytes(self._input)
        return ConsoleState(self.STATE_VERSION, self._port_open, tuple(self._replies),
                            self._backlog_full, pending)

    def check_state(self, state: ConsoleState) -> None:
        from pyvirt.devices.statecheck import check_bool, check_bytes, check_int

        super().check_state(state)
        check_bool(self.name, "port_open", state.port_open)
        check_bool(self.name, "backlog_full", state.backlog_full)
        check_int(self.name, "len(replies)", len(state.replies), 0, _CONTROL_BACKLOG)
        for i, msg in enumerate(state.replies):
            check_bytes(self.name, f"replies[{i}]", msg, length=_CONTROL.size)
        check_bytes(self.name, "pending_input", state.pending_input, max_len=INPUT_LIMIT)

    def restore_state(self, state: ConsoleState) -> None:
        """After ``activate`` when the record is DRIVER_OK, else after ``reset``."""
        self.check_state(state)
        self._port_open = state.port_open
        self._replies = deque(state.replies)
        self._backlog_full = state.backlog_full
        with self._lock:
            self._input = bytearray(state.pending_input)
        if self._input:  # handed out once the queue work runs again
            os.eventfd_write(self._wake, 1)

    def metrics(self) -> dict[str, int]:
        return {"tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes}

    def close(self) -> None:
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

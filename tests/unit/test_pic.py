"""The emulated 8259 pair, programmed the way Linux's i8259.c does it."""

from __future__ import annotations

from pyvirt.hypervisor.emulated.pic import Pic8259Pair


def out(dev: object, port_off: int, value: int) -> None:
    dev.write(port_off, memoryview(bytearray([value])))  # type: ignore[attr-defined]


def inb(dev: object, port_off: int) -> int:
    buf = bytearray(1)
    dev.read(port_off, memoryview(buf))  # type: ignore[attr-defined]
    return buf[0]


class Rig:
    def __init__(self, auto_eoi: bool = False) -> None:
        self.outputs: list[bool] = []
        self.pic = Pic8259Pair(on_output=self.outputs.append)
        m, s = self.pic.master_device, self.pic.slave_device
        # init_8259A()
        out(m, 1, 0xFF)
        out(s, 1, 0xFF)
        out(m, 0, 0x11)  # ICW1: edge, cascade, ICW4 needed
        out(m, 1, 0x30)  # ICW2: vector base 0x30
        out(m, 1, 0x04)  # ICW3: slave on IR2
        out(m, 1, 0x03 if auto_eoi else 0x01)  # ICW4: 8086 mode (+AEOI)
        out(s, 0, 0x11)
        out(s, 1, 0x38)
        out(s, 1, 0x02)
        out(s, 1, 0x01)
        out(m, 1, 0xFB)  # everything masked but the cascade
        out(s, 1, 0xFF)

    def master_eoi(self, irq: int) -> None:
        out(self.pic.master_device, 0, 0x60 + irq)  # specific EOI

    def slave_eoi(self, irq: int) -> None:
        out(self.pic.slave_device, 0, 0x60 + (irq & 7))
        out(self.pic.master_device, 0, 0x62)


def test_probe_and_imr() -> None:
    r = Rig()
    out(r.pic.master_device, 1, 0x5A)
    assert inb(r.pic.master_device, 1) == 0x5A


def test_masking_and_vector() -> None:
    r = Rig()
    r.pic.set_irq(4, True)
    assert not r.pic.has_interrupt()
    assert r.pic.get_interrupt() is None
    out(r.pic.master_device, 1, 0xEB)  # unmask IRQ4
    assert r.pic.has_interrupt()
    assert r.outputs[-1] is True
    assert r.pic.get_interrupt() == 0x34
    assert not r.pic.has_interrupt()
    assert r.outputs[-1] is False
    # ISR read via OCW3
    out(r.pic.master_device, 0, 0x0B)
    assert inb(r.pic.master_device, 0) == 0x10
    out(r.pic.master_device, 0, 0x0A)
    assert inb(r.pic.master_device, 0) == 0x00  # edge request consumed by INTA
    r.master_eoi(4)
    out(r.pic.master_device, 0, 0x0B)
    assert inb(r.pic.master_device, 0) == 0


def test_priority_nesting_and_specific_eoi() -> None:
    r = Rig()
    out(r.pic.master_device, 1, 0x00)
    r.pic.set_irq(4, True)
    assert r.pic.get_interrupt() == 0x34
    r.pic.set_irq(3, True)  # higher priority nests
    r.pic.set_irq(6, True)  # lower priority waits
    assert r.pic.get_interrupt() == 0x33
    assert r.pic.get_interrupt() is None
    r.master_eoi(3)
    assert r.pic.get_interrupt() is None  # IRQ4 still in service
    out(r.pic.master_device, 0, 0x20)  # non-specific EOI: clears IRQ4
    assert r.pic.get_interrupt() == 0x36


def test_slave_cascade() -> None:
    r = Rig()
    out(r.pic.slave_device, 1, 0xEF)  # unmask IRQ12
    r.pic.set_irq(12, True)
    assert r.pic.has_interrupt()
    assert r.pic.get_interrupt() == 0x3C
    r.pic.set_irq(12, False)
    r.pic.set_irq(12, True)
    assert r.pic.get_interrupt() is None  # master IR2 still in service
    r.slave_eoi(12)
    assert r.pic.get_interrupt() == 0x3C


def test_level_mode_via_elcr() -> None:
    r = Rig()
    elcr = r.pic.elcr_device
    out(elcr, 1, 0x02)  # IRQ9 level
    out(elcr, 0, 0x07)  # IRQ0-2 cannot be level
    assert inb(elcr, 0) == 0 and inb(elcr, 1) == 0x02
    out(r.pic.slave_device, 1, 0xFD)
    r.pic.set_irq(9, True)
    assert r.pic.get_interrupt() == 0x39
    r.slave_eoi(9)
    assert r.pic.get_interrupt() == 0x39  # still asserted: requested again
    r.slave_eoi(9)
    r.pic.set_irq(9, False)
    assert not r.pic.has_interrupt()
    assert r.pic.get_interrupt() is None


def test_spurious_irq15_when_slave_request_vanishes() -> None:
    r = Rig()
    out(r.pic.slave_device, 1, 0xFD)
    out(r.pic.elcr_device, 1, 0x02)
    r.pic.set_irq(9, True)
    # the guest masks IRQ9 on the slave between INT and INTA: the master still
    # has IR2 latched, the slave has nothing and answers with its IR7
    r.pic.slave.imr = 0xFF
    r.pic.master.irr |= 4
    assert r.pic.get_interrupt() == 0x3F
    out(r.pic.slave_device, 0, 0x0B)
    assert inb(r.pic.slave_device, 0) == 0  # ISR7 not set: Linux sees it is spurious


def test_spurious_irq7_master() -> None:
    r = Rig()
    assert r.pic.intack_spurious() == 0x37
    out(r.pic.master_device, 0, 0x0B)
    assert inb(r.pic.master_device, 0) == 0


def test_auto_eoi() -> None:
    r = Rig(auto_eoi=True)
    out(r.pic.master_device, 1, 0x00)
    r.pic.set_irq(1, True)
    assert r.pic.get_interrupt() == 0x31
    out(r.pic.master_device, 0, 0x0B)
    assert inb(r.pic.master_device, 0) == 0
    r.pic.set_irq(4, True)
    assert r.pic.get_interrupt() == 0x34  # nothing in service blocks it


def test_rotation() -> None:
    r = Rig()
    out(r.pic.master_device, 1, 0x00)
    r.pic.set_irq(1, True)
    r.pic.set_irq(5, True)
    out(r.pic.master_device, 0, 0xC4)  # set priority: IR4 lowest, IR5 highest
    assert r.pic.get_interrupt() == 0x35
    out(r.pic.master_device, 0, 0xA0)  # rotate on non-specific EOI: IR5 now lowest
    assert r.pic.get_interrupt() == 0x31


def test_poll_command() -> None:
    r = Rig()
    out(r.pic.master_device, 1, 0x00)
    r.pic.set_irq(6, True)
    out(r.pic.master_device, 0, 0x0C)  # OCW3 poll
    assert inb(r.pic.master_device, 0) == 0x86
    out(r.pic.master_device, 0, 0x0B)
    assert inb(r.pic.master_device, 0) == 0x40


def test_reinit_clears_state() -> None:
    r = Rig()
    out(r.pic.master_device, 1, 0x00)
    r.pic.set_irq(3, True)
    assert r.pic.get_interrupt() == 0x33
    out(r.pic.master_device, 0, 0x11)
    out(r.pic.master_device, 1, 0x08)
    out(r.pic.master_device, 1, 0x04)
    out(r.pic.master_device, 1, 0x01)
    assert inb(r.pic.master_device, 1) == 0
    out(r.pic.master_device, 0, 0x0B)
    assert inb(r.pic.master_device, 0) == 0
    r.pic.set_irq(3, False)
    r.pic.set_irq(3, True)
    assert r.pic.get_interrupt() == 0x0B


def test_state_roundtrip() -> None:
    import dataclasses

    import pytest

    from pyvirt.hypervisor.emulated.pic import Pic8259Pair, PicPairState
    from pyvirt.state import StateError, decode, encode

    r = Rig()
    out(r.pic.master_device, 1, 0xEB)  # unmask IRQ4
    out(r.pic.elcr_device, 1, 0x02)  # IRQ9 level
    r.pic.set_irq(4, True)
    assert r.pic.get_interrupt() == 0x34  # IRQ4 in service
    r.pic.set_irq(5, True)  # pending behind the mask
    out(r.pic.master_device, 0, 0x0B)  # OCW3: read ISR
    st = decode(encode(r.pic.save_state()), PicPairState, part="pic")
    outputs: list[bool] = []
    p2 = Pic8259Pair(on_output=outputs.append)
    p2.restore_state(st)
    assert outputs == []  # the saved output level is not re-announced
    assert inb(p2.master_device, 0) == 0x10  # ISR read still selected
    assert inb(p2.master_device, 1) == 0xEB
    assert inb(p2.elcr_device, 1) == 0x02
    out(p2.master_device, 1, 0xCB)  # unmask IRQ5: waits for IRQ4's EOI (higher priority)
    assert not p2.has_interrupt()
    out(p2.master_device, 0, 0x64)  # specific EOI 4
    assert p2.get_interrupt() == 0x35
    bad_master = dataclasses.replace(st.master, lowest=8)
    for bad in (dataclasses.replace(st, version=3),
                dataclasses.replace(st, master=bad_master),
                dataclasses.replace(st, slave=dataclasses.replace(st.slave, init_step=1)),
                dataclasses.replace(st, slave=dataclasses.replace(st.slave, imr=256))):
        with pytest.raises(StateError, match="pic"):
            p2.restore_state(bad)

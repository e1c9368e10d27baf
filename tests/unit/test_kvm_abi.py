"""The ctypes mirror in ``pyvirt.kvm._abi`` against the host's ``<linux/kvm.h>``.

A C program is generated from the Python tables (every mirrored structure, each
of its fields recursively, every ioctl number and constant), compiled with gcc
and run; its output must equal what ctypes computes. Needs gcc and the
linux-libc-dev headers, not /dev/kvm.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pyvirt.kvm import _abi
from pyvirt.kvm._ioctl import _IO, _IOC, _IOR, _IOW, _IOWR, IOC_READ, IOC_WRITE

_CAggregate = type[ctypes.Structure] | type[ctypes.Union]


def _fields(cls: _CAggregate, prefix: str = "", base: int = 0) -> Iterator[tuple[str, int, int]]:
    """(C member designator, offset from the top struct, size) for every field, recursively."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for spec in cls._fields_:
        name, ftype = spec[0], cast("Any", spec[1])
        desc = getattr(cls, name)
        offset = base + desc.offset
        if name in anonymous:  # a C anonymous struct/union: its members belong to the parent
            yield from _fields(ftype, prefix, offset)
            continue
        yield prefix + name, offset, desc.size
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure | ctypes.Union):
            yield from _fields(ftype, f"{prefix}{name}.", offset)


def _python_side() -> dict[str, int]:
    values: dict[str, int] = {}
    for cname, cls in _abi.STRUCTS.items():
        values[f"sizeof {cname}"] = ctypes.sizeof(cls)
        for path, offset, size in _fields(cls):
            values[f"offsetof {cname} {path}"] = offset
            if size:  # a flexible array member has no size in C
                values[f"sizeof {cname} {path}"] = size
    for table in (_abi.IOCTLS, _abi.EXIT_REASONS, _abi.CAPS, _abi.CONSTANTS):
        for name, value in table.items():
            values[f"value {name}"] = value
    return values


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for cname, cls in _abi.STRUCTS.items():
        lines.append(f'  printf("sizeof {cname}=%zu\\n", sizeof({cname}));')
        for path, _offset, size in _fields(cls):
            lines.append(f'  printf("offsetof {cname} {path}=%zu\\n", offsetof({cname}, {path}));')
            if size:
                lines.append(
                    f'  printf("sizeof {cname} {path}=%zu\\n", sizeof((({cname} *)0)->{path}));'
                )
    for table in (_abi.IOCTLS, _abi.EXIT_REASONS, _abi.CAPS, _abi.CONSTANTS):
        for name in table:
            lines.append(f'  printf("value {name}=%llu\\n", (unsigned long long)({name}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_side(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (install gcc)")
    if not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("no <linux/kvm.h> (install linux-libc-dev)")
    work = tmp_path_factory.mktemp("kvm_abi")
    (work / "abi.c").write_text(_c_program())
    build = subprocess.run(
        [gcc, "-Wall", "-Werror", "-o", str(work / "abi"), str(work / "abi.c")],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:  # a field or constant the header does not have
        pytest.fail(f"the generated C does not compile:\n{build.stderr[-4000:]}")
    out = subprocess.run([str(work / "abi")], check=True, capture_output=True, text=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        key, _, value = line.rpartition("=")
        values[key] = int(value)
    return values


def test_every_size_offset_and_number_matches_the_host_header(c_side: dict[str, int]) -> None:
    python_side = _python_side()
    assert python_side.keys() == c_side.keys()
    mismatches = {k: (v, c_side[k]) for k, v in python_side.items() if c_side[k] != v}
    assert mismatches == {}, "ctypes value, C value"


def test_the_tables_cover_what_the_task_needs() -> None:
    needed_structs = {
        "kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs",
        "kvm_fpu", "kvm_msr_entry", "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2",
        "kvm_cpuid2", "kvm_run", "kvm_irq_level", "kvm_pit_config", "kvm_mp_state",
        "kvm_irqfd", "kvm_ioeventfd", "kvm_irq_routing", "kvm_irq_routing_entry", "kvm_msi",
        "kvm_lapic_state", "kvm_clock_data", "kvm_vcpu_events", "kvm_xcrs", "kvm_enable_cap",
        # a complete saved state (issue #9)
        "kvm_xsave", "kvm_debugregs", "kvm_irqchip", "kvm_pic_state", "kvm_ioapic_state",
        "kvm_pit_state2", "kvm_pit_channel_state",
    }  # fmt: skip
    assert {f"struct {n}" for n in needed_structs} <= _abi.STRUCTS.keys()
    run_members = {path for path, _, _ in _fields(_abi.kvm_run)}
    for member in (
        "io.port",
        "mmio.data",
        "hypercall.nr",
        "internal.data",
        "fail_entry.cpu",
        "system_event.data",
        "ex.error_code",
        "immediate_exit",
        "request_interrupt_window",
        "cr8",
        "apic_base",
        "if_flag",
        "flags",
    ):
        assert member in run_members


def test_the_saved_state_ioctls_are_mirrored() -> None:
    for name in ("KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XSAVE2", "KVM_GET_IRQCHIP",
                 "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_DEBUGREGS",
                 "KVM_SET_DEBUGREGS", "KVM_GET_TSC_KHZ", "KVM_SET_TSC_KHZ", "KVM_KVMCLOCK_CTRL",
                 "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_GET_MSR_INDEX_LIST"):
        assert name in _abi.IOCTLS
    assert len(_abi.IOCTL_NAMES) == len(_abi.IOCTLS)  # no two ioctls share a number
    # the irqchip union: 512 bytes, holding either PIC or the IOAPIC
    assert ctypes.sizeof(_abi.kvm_irqchip) == 8 + 512
    assert ctypes.sizeof(_abi.kvm_xsave) == 4096
    assert ctypes.sizeof(_abi.flex(_abi.kvm_xsave, 2)) == 4096 + 8


def test_ioc_encoding() -> None:
    assert _IO(0xAE, 0x80) == 0xAE80
    assert _IOR(0xAE, 0x81, _abi.kvm_regs) == (2 << 30) | (144 << 16) | 0xAE81
    assert _IOW(0xAE, 0x82, _abi.kvm_regs) == (1 << 30) | (144 << 16) | 0xAE82
    assert _IOWR(0xAE, 0x05, _abi.kvm_cpuid2) == ((IOC_READ | IOC_WRITE) << 30) | (8 << 16) | 0xAE05
    with pytest.raises(ValueError):
        _IOC(IOC_WRITE, 0xAE, 0, 1 << 14)


def test_flex_builds_sized_variants() -> None:
    msrs = _abi.flex(_abi.kvm_msrs, 3)
    assert ctypes.sizeof(msrs) == 8 + 3 * 16
    assert _abi.flex(_abi.kvm_msrs, 3) is msrs  # cached
    routing = _abi.flex(_abi.kvm_irq_routing, 2)
    assert ctypes.sizeof(routing) == 8 + 2 * 48
    assert ctypes.sizeof(_abi.flex(_abi.kvm_msr_list, 5)) == 4 + 5 * 4

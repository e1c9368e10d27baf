"""ctypes bindings for pyvirt's unicorn patches (third_party/unicorn/patches).

The stock Python binding knows nothing about the ``uc_x86_*`` functions the
patch series adds, so they are bound here on the same library handle the
binding loaded (``unicorn.unicorn_py3.unicorn.uclib``). ``available()`` tells
whether the installed libunicorn is the patched build.
"""

from __future__ import annotations

import ctypes
from typing import Any

# Exit reasons (uc_x86_exit).
EXIT_NONE = 0
EXIT_STOP = 1
EXIT_HLT = 2
EXIT_SHUTDOWN = 3
EXIT_ERROR = 4

# Segment numbers (uc_x86_seg), equal to QEMU's R_ES..R_GS.
SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = range(6)

# Interrupt lines (uc_x86_irq_line).
IRQ_HARD = 1
IRQ_NMI = 2

# Halt modes (uc_x86_halt_mode).
HALT_STOCK = 0
HALT_RETURN = 1
HALT_BLOCK = 2

# MSR callback results (uc_x86_msr_result).
MSR_NATIVE = 0
MSR_HANDLED = 1
MSR_GP = 2

UC_ENGINE = ctypes.c_void_p
IRQ_CB = ctypes.CFUNCTYPE(ctypes.c_int, UC_ENGINE, ctypes.c_void_p)
MSR_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    UC_ENGINE,
    ctypes.c_uint32,
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.c_void_p,
)
CPUID_CB = ctypes.CFUNCTYPE(
    None,
    UC_ENGINE,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_void_p,
)

_PROTOTYPES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "uc_x86_load_segment": (
        ctypes.c_int,
        (
            UC_ENGINE,
            ctypes.c_int,
            ctypes.c_uint16,
            ctypes.c_uint64,
            ctypes.c_uint32,
            ctypes.c_uint32,
        ),
    ),
    "uc_x86_exit_reason": (ctypes.c_int, (UC_ENGINE,)),
    "uc_x86_kick": (ctypes.c_int, (UC_ENGINE,)),
    "uc_x86_set_irq_callback": (ctypes.c_int, (UC_ENGINE, IRQ_CB, ctypes.c_void_p)),
    "uc_x86_raise_irq": (ctypes.c_int, (UC_ENGINE, ctypes.c_int)),
    "uc_x86_lower_irq": (ctypes.c_int, (UC_ENGINE, ctypes.c_int)),
    "uc_x86_set_halt_mode": (ctypes.c_int, (UC_ENGINE, ctypes.c_int)),
    "uc_x86_is_halted": (ctypes.c_int, (UC_ENGINE,)),
    "uc_x86_set_msr_callback": (ctypes.c_int, (UC_ENGINE, MSR_CB, ctypes.c_void_p)),
    "uc_x86_set_cpuid_callback": (ctypes.c_int, (UC_ENGINE, CPUID_CB, ctypes.c_void_p)),
    "uc_x86_invalidate_phys": (ctypes.c_int, (UC_ENGINE, ctypes.c_uint64, ctypes.c_size_t)),
    "uc_x86_add_ioeventfd": (ctypes.c_int, (UC_ENGINE, ctypes.c_uint64, ctypes.c_uint32,
                                            ctypes.c_int)),
    "uc_x86_remove_ioeventfd": (ctypes.c_int, (UC_ENGINE, ctypes.c_uint64, ctypes.c_uint32,
                                               ctypes.c_int)),
    # stock unicorn, bound here with exact types for the saved CPU context
    "uc_context_size": (ctypes.c_size_t, (UC_ENGINE,)),
    "uc_context_alloc": (ctypes.c_int, (UC_ENGINE, ctypes.POINTER(ctypes.c_void_p))),
    "uc_context_save": (ctypes.c_int, (UC_ENGINE, ctypes.c_void_p)),
    "uc_context_restore": (ctypes.c_int, (UC_ENGINE, ctypes.c_void_p)),
    "uc_context_free": (ctypes.c_int, (ctypes.c_void_p,)),
}

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The unicorn library with the pyvirt prototypes set (raises if unpatched)."""
    global _lib
    if _lib is None:
        from unicorn.unicorn_py3 import unicorn as _ucmod

        handle: ctypes.CDLL = _ucmod.uclib
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(handle, name, None)
            if fn is None:
                raise ImportError(
                    f"libunicorn lacks {name}: run third_party/unicorn/build.sh to install "
                    "pyvirt's patched build"
                )
            fn.restype = restype
            fn.argtypes = list(argtypes)
        _lib = handle
    return _lib


def available() -> bool:
    """True when the installed unicorn is the pyvirt-patched build."""
    try:
        lib()
    except ImportError:
        return False
    return True

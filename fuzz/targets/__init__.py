"""One module per fuzz target. Each defines ``one_input(data: bytes) -> None`` and may
define ``MAX_LEN`` (the largest input, default 4096) and ``seeds() -> list[bytes]``."""

#: every target, in the order ``make fuzz`` runs them
TARGETS = (
    "virtqueue",
    "virtio_blk",
    "virtio_rng",
    "virtio_console",
    "virtio_vsock",
    "virtio_net",
    "pci_config",
    "msix",
    "uart",
    "i8042",
    "rtc",
    "acpi_pm",
    "loader_bzimage",
    "loader_elf",
    "loader_initrd",
    "config",
    "saved_state",
    "qcow2",
)

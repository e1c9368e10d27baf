"""The software CPU backend: the CPU engine and the interrupt controllers in Python.

Under KVM the kernel emulates the LAPIC, IOAPIC, 8259 PIC pair and 8254 PIT;
here ``EmulatedIrqChip`` (``irqchip``) provides the same machine so a stock
guest sees identical ACPI tables and hardware under both backends.
"""

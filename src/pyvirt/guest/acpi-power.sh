#!/bin/sh
# Run by acpid when the ACPI power button is pressed: a clean power-off (busybox
# init runs its shutdown entries, then the kernel powers off through ACPI S5).
exec /sbin/poweroff

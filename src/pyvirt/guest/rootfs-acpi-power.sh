#!/bin/sh
# Run by busybox acpid (started by /sbin/pyvirt-init) when the ACPI power button is
# pressed: stop the shell's processes, then the same clean power-off as the
# `poweroff` command (sync, root read-only, ACPI S5 through sysrq).
kill -TERM -1 2>/dev/null
sleep 0.2
sync
mount -o remount,ro / 2>/dev/null
echo o >/proc/sysrq-trigger

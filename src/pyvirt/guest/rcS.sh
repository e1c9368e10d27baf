#!/bin/sh
# sysinit of the pyvirt default guest (run by busybox init from /etc/inittab).
# Idempotent: /init may already have mounted some of this. (Debian's static busybox
# has no mountpoint applet, hence /proc/mounts.)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }
[ -e /proc/self ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
/etc/init.d/load-modules
# The ACPI power button (pyvirt's power-button action, QEMU's system_powerdown):
# the button driver reports KEY_POWER on an evdev node; acpid runs
# /etc/acpi/PWRF/00000080 for it, which powers off cleanly through init.
acpid -c /etc/acpi -l /dev/null -p /run/acpid.pid 2>/dev/null
# With console=hvc0 the console driver is one of those modules, so init handed us a
# dead /dev/console. Do not reopen it here: the first open of hvc0 starts pulling the
# host's input into the tty, and our exit would close it (the last holder) and drop
# that input. The shell's cttyhack is the first to open it.
hostname pyvirt
# eth0 up (DHCP, or static from pyvirt.ip=); see /etc/init.d/net-up
/etc/init.d/net-up
# The ready line comes from /etc/profile, once the shell holds the console open (on
# hvc0 nothing opens it before: input sent earlier waits in the device until then).

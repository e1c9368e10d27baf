#!/bin/sh
# poweroff / reboot / halt for the pyvirt root filesystem, which has no systemd or
# sysvinit: sync, then the kernel's magic SysRq (o = power off, b = reboot).
sync
case "${0##*/}" in
    reboot) echo b >/proc/sysrq-trigger ;;
    *) echo o >/proc/sysrq-trigger ;;
esac

#!/bin/sh
# /sbin/pyvirt-init: PID 1 of the pyvirt Debian root filesystem (pyvirt.guest.rootfs).
# The initramfs' /init switch_roots here (it prefers this over /sbin/init, which the
# minbase image does not have). No systemd: mount the API filesystems, run one bash on
# the console's tty with job control, and power off when it exits.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM="${TERM:-linux}"
mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }

# /init normally moved proc, sys and dev here already.
[ -e /proc/self ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
# Writable scratch space whether the root is mounted read-only or not.
mounted /run || mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mounted /tmp || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
hostname pyvirt
# The ACPI power button: the initramfs loaded button + evdev; busybox acpid runs
# /etc/acpi/PWRF/00000080 (a clean power-off) on KEY_POWER.
busybox acpid -c /etc/acpi -l /dev/null -p /run/acpid.pid 2>/dev/null
# eth0 up: DHCP (busybox udhcpc), or static from pyvirt.ip= (see pyvirt-net-up)
/usr/sbin/pyvirt-net-up

# The console's real tty (busybox cttyhack's rule: the last entry of .../active), so the
# shell can make it its controlling terminal: /dev/console cannot be one.
tty=
for t in $(cat /sys/class/tty/console/active 2>/dev/null); do tty=$t; done
if [ -z "$tty" ] || [ ! -c "/dev/$tty" ]; then tty=console; fi

editing=
case " $(cat /proc/cmdline) " in *" pyvirt.noecho "*) editing=--noediting ;; esac

# The ready line is printed by /etc/pyvirt/bashrc once bash holds the tty.
setsid -c /bin/bash --noprofile --rcfile /etc/pyvirt/bashrc $editing -i \
    <"/dev/$tty" >"/dev/$tty" 2>&1

# The shell is gone: power off (no systemd here; sysrq 'o' needs only CONFIG_MAGIC_SYSRQ).
sync
mount -o remount,ro / 2>/dev/null
echo o >/proc/sysrq-trigger
# PID 1 must not exit (that panics); the power-off happens from a kernel work item.
while :; do sleep 60; done

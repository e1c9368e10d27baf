#!/bin/sh
# Bring the guest's network up at boot (the pyvirt default guest's rcS and the Debian
# rootfs' pyvirt-init both run this). The kernel command line decides:
#   pyvirt.net=off                      nothing but lo
#   pyvirt.ip=ADDR/PREFIX[,GATEWAY]     eth0 static (tests on a TAP with no DHCP server)
#   (neither)                           eth0 by DHCP: busybox udhcpc, in the background
#                                       once the first tries get no answer
# Other NICs get their link up; `udhcpc -i ethN` configures one by hand.
export PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin
bb=
command -v udhcpc >/dev/null 2>&1 || bb=busybox  # the rootfs: busybox-static's applet
ip link set lo up 2>/dev/null
cmdline=" $(cat /proc/cmdline 2>/dev/null) "
case "$cmdline" in *" pyvirt.net=off "*) exit 0 ;; esac
static=
for word in $cmdline; do
    case "$word" in pyvirt.ip=*) static=${word#pyvirt.ip=} ;; esac
done
for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] && ip link set "${dev##*/}" up
done
[ -e /sys/class/net/eth0 ] || exit 0
if [ -n "$static" ]; then
    addr=${static%%,*}
    gw=
    case "$static" in *,*) gw=${static#*,} ;; esac
    ip addr add "$addr" dev eth0
    [ -n "$gw" ] && ip route add default via "$gw" dev eth0
    exit 0
fi
# Three tries a second apart, then on in the background (no answer: boot goes on).
$bb udhcpc -i eth0 -s /usr/share/udhcpc/default.script -b -t 3 -T 1 -O mtu -x hostname:pyvirt \
    -p /run/udhcpc.eth0.pid >/dev/null 2>&1
exit 0

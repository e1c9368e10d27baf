#!/bin/sh
# Load the initramfs' kernel modules in dependency order (listed by the builder).
# Quiet and tolerant: a module may already be loaded, or fail on this CPU (crc32c-intel).
dir="/lib/modules/$(uname -r)"
[ -r "$dir/pyvirt.load" ] || exit 0
while read -r mod; do
    [ -n "$mod" ] && insmod "$dir/$mod" 2>/dev/null
done < "$dir/pyvirt.load"
exit 0

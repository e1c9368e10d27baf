#!/bin/sh
# Build the test guest ELF: build.sh OUTDIR. Needs gcc and binutils only.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mkdir -p "$out"
gcc -ffreestanding -fno-pic -fno-pie -no-pie -nostdlib -static -mno-red-zone \
    -mgeneral-regs-only -fno-stack-protector -fcf-protection=none -O2 -Wall -Wextra \
    -Wl,-T,"$here/guest.ld" -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 -Wl,-z,noexecstack \
    -o "$out/testguest.elf.tmp" "$here/entry.S" "$here/guest.c"
mv "$out/testguest.elf.tmp" "$out/testguest.elf"

#!/bin/sh
# Build the guest-side stress program: build.sh OUTDIR -> OUTDIR/hammer (static, glibc).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mkdir -p "$out"
gcc -static -O2 -Wall -Wextra -o "$out/hammer.tmp" "$here/hammer.c"
mv "$out/hammer.tmp" "$out/hammer"

#!/usr/bin/env bash
# Build the patched unicorn (x86 only) and install it into a Python environment.
#
#   third_party/unicorn/build.sh [PYTHON]      (default: <repo>/.venv/bin/python)
#
# Idempotent: the installed package carries a stamp with the hash of the sdist
# version, this script and the patch series; when it matches, nothing is done.
# Environment:
#   UNICORN_SDIST  path to unicorn-2.1.4.tar.gz (else it is pip-downloaded)
#   JOBS           parallel build jobs (default 2)
#   FORCE=1        rebuild even if the stamp matches
set -euo pipefail

VERSION=2.1.4
SDIST_SHA256=00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${1:-${PYTHON:-$REPO/.venv/bin/python}}"
JOBS="${JOBS:-2}"
BUILD="$HERE/build"
SRC="$BUILD/unicorn-$VERSION"
STAMP_NAME="pyvirt-patches.stamp"

log() { echo "[unicorn-build] $*" >&2; }

# The stamp covers everything that determines the binary we install.
stamp() {
    {
        echo "unicorn $VERSION $SDIST_SHA256"
        sha256sum "$HERE/build.sh" | cut -d' ' -f1
        for p in "$HERE"/patches/*.patch; do
            [ -e "$p" ] || continue
            echo "$(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -d' ' -f1
}

installed_pkg_dir() {
    "$PY" - <<'EOF' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("unicorn")
if spec and spec.origin:
    print(os.path.dirname(spec.origin))
EOF
}

WANT="$(stamp)"
PKG="$(installed_pkg_dir)"
if [ "${FORCE:-0}" != 1 ] && [ -n "$PKG" ] && [ -f "$PKG/lib/$STAMP_NAME" ] \
    && [ "$(cat "$PKG/lib/$STAMP_NAME")" = "$WANT" ]; then
    log "installed unicorn already matches the patch series ($WANT); nothing to do"
    exit 0
fi

mkdir -p "$BUILD/dl"
TARBALL="$BUILD/dl/unicorn-$VERSION.tar.gz"
if [ ! -f "$TARBALL" ]; then
    if [ -n "${UNICORN_SDIST:-}" ] && [ -f "$UNICORN_SDIST" ]; then
        cp "$UNICORN_SDIST" "$TARBALL"
    else
        log "downloading the unicorn $VERSION sdist from PyPI"
        "$PY" -m pip download --quiet --no-deps --no-binary :all: \
            "unicorn==$VERSION" -d "$BUILD/dl"
    fi
fi
echo "$SDIST_SHA256  $TARBALL" | sha256sum -c --quiet - || {
    log "sdist checksum mismatch: $TARBALL"
    exit 1
}

# Always patch a fresh tree so the result depends only on sdist + patches.
log "extracting and patching"
rm -rf "$SRC"
tar -xzf "$TARBALL" -C "$BUILD"
for p in "$HERE"/patches/*.patch; do
    [ -e "$p" ] || continue
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --quiet --no-backup-if-mismatch < "$p"
done

log "building libunicorn (x86 only, -j$JOBS)"
start=$(date +%s)
cmake -S "$SRC/src" -B "$SRC/src/build_pyvirt" -DCMAKE_BUILD_TYPE=Release \
    -DUNICORN_ARCH=x86 -DUNICORN_BUILD_TESTS=off >"$BUILD/cmake.log" 2>&1 || {
    tail -30 "$BUILD/cmake.log"
    exit 1
}
cmake --build "$SRC/src/build_pyvirt" -j"$JOBS" >"$BUILD/make.log" 2>&1 || {
    grep -E "error|Error" "$BUILD/make.log" | head -30
    exit 1
}
log "library built in $(($(date +%s) - start)) s"

# setup.py installs a library found in prebuilt/ instead of building its own
# (all-architecture) one.
mkdir -p "$SRC/prebuilt"
cp "$SRC/src/build_pyvirt/libunicorn.so.2" "$SRC/prebuilt/"
cp "$SRC/src/build_pyvirt/libunicorn.a" "$SRC/prebuilt/"

log "installing into $PY"
"$PY" -m pip install --quiet --no-deps --force-reinstall "$SRC" >"$BUILD/pip.log" 2>&1 || {
    tail -30 "$BUILD/pip.log"
    exit 1
}
PKG="$(installed_pkg_dir)"
echo "$WANT" >"$PKG/lib/$STAMP_NAME"
# which patches this build carries, for `pyvirt run --verbose`
(cd "$HERE/patches" && ls *.patch) >"$PKG/lib/pyvirt-patches.list"
"$PY" -c "import unicorn; print('[unicorn-build] installed unicorn', unicorn.__version__)" >&2

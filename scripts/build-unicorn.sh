#!/bin/sh
# Build the patched Unicorn that hvsim runs child VPs on (see
# tests/hvsim/model/ucx.py and tests/hvsim/unicorn/README.md).
#
# Downloads Unicorn's published source release from PyPI (pinned version and
# SHA-256), applies tests/hvsim/unicorn/patches/*.patch in order, builds the
# x86 target only (about 30 s on 2 cores) and installs libunicorn.so.2 under
# .cache/unicorn/<version>/. The build is keyed by the patches' hash: a second
# run with the same patches does nothing.
set -eu

VERSION=2.1.4
SHA256=00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PATCHES="$ROOT/tests/hvsim/unicorn/patches"
CACHE=${HVSIM_UNICORN_CACHE:-$ROOT/.cache/unicorn}
DEST="$CACHE/$VERSION"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

KEY=$(cat "$PATCHES"/*.patch | sha256sum | cut -d' ' -f1)
if [ -f "$DEST/libunicorn.so.2" ] && [ "$(cat "$DEST/patches.sha256" 2>/dev/null)" = "$KEY" ]; then
    echo "build-unicorn: patched Unicorn $VERSION is up to date in $DEST"
    exit 0
fi

for tool in cmake ninja gcc patch; do
    command -v "$tool" >/dev/null || { echo "build-unicorn: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

WORK="$CACHE/build"
rm -rf "$WORK"
mkdir -p "$WORK" "$CACHE/dist"
TARBALL="$CACHE/dist/unicorn-$VERSION.tar.gz"
if [ ! -f "$TARBALL" ] || ! echo "$SHA256  $TARBALL" | sha256sum -c --status; then
    echo "build-unicorn: downloading unicorn-$VERSION source from PyPI"
    "$PY" -m pip download --quiet --no-binary :all: --no-deps --no-build-isolation \
        --dest "$CACHE/dist" "unicorn==$VERSION" 2>/dev/null ||
        "$PY" -m pip download --quiet --no-binary :all: --no-deps --dest "$CACHE/dist" "unicorn==$VERSION"
fi
echo "$SHA256  $TARBALL" | sha256sum -c --status || {
    echo "build-unicorn: $TARBALL does not match the pinned SHA-256" >&2; exit 1; }

echo "build-unicorn: unpacking and applying $(ls "$PATCHES"/*.patch | wc -l) patch(es)"
tar -xzf "$TARBALL" -C "$WORK"
SRC="$WORK/unicorn-$VERSION/src"
for p in "$PATCHES"/*.patch; do
    echo "build-unicorn:   $(basename "$p")"
    patch -s -p1 -d "$SRC" < "$p"
done

echo "build-unicorn: building the x86 target (cmake + ninja)"
cmake -S "$SRC" -B "$WORK/out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DUNICORN_ARCH=x86 -DUNICORN_BUILD_TESTS=off \
    -DCMAKE_C_FLAGS="-Werror=implicit-function-declaration" >"$WORK/cmake.log" 2>&1 ||
    { tail -20 "$WORK/cmake.log"; exit 1; }
ninja -C "$WORK/out" unicorn >"$WORK/ninja.log" 2>&1 || { grep -B2 -A8 -m3 "error" "$WORK/ninja.log"; exit 1; }

mkdir -p "$DEST"
cp -L "$WORK/out/libunicorn.so.2" "$DEST/libunicorn.so.2.tmp"
mv "$DEST/libunicorn.so.2.tmp" "$DEST/libunicorn.so.2"
echo "$KEY" > "$DEST/patches.sha256"
rm -rf "$WORK"
echo "build-unicorn: installed $DEST/libunicorn.so.2"

#!/usr/bin/env bash
# Install what building and testing mshv_root needs on Debian 12, and say so.
# Idempotent: a second run installs nothing. Runs apt-get as root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

pkgs=(gcc g++ make binutils kmod sparse python3 python3-venv python3-yaml python3-jsonschema
      qemu-system-x86 busybox-static cpio xz-utils zstd cmake ninja-build patch)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

updated=""
apt_update() {
	if [ -z "$updated" ]; then
		say "apt-get update"
		$SUDO apt-get update -qq
		updated=1
	fi
}

# Debian 12 kernel headers: the newest 6.1 and 6.12 amd64 flavours, unless
# some version of each series is installed already.
for series in '6\.1\.0-[0-9]+-amd64' '6\.12\.[0-9]+\+deb12-amd64'; do
	if ! ls /usr/src 2>/dev/null | grep -Eq "^linux-headers-${series}\$"; then
		apt_update
		pkg=$(apt-cache search --names-only "^linux-headers-${series}\$" | cut -d' ' -f1 | sort -V | tail -n 1)
		if [ -z "$pkg" ]; then
			echo "setup: error: no package matches linux-headers-${series}" >&2
			exit 1
		fi
		missing+=("$pkg")
	fi
done

if [ "${#missing[@]}" -gt 0 ]; then
	apt_update
	say "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
	say "Debian packages present"
fi

# Python venv with pinned packages for the generator and the tests.
req=tests/requirements.txt
if [ ! -x .venv/bin/python ] || ! cmp -s "$req" .venv/.requirements 2>/dev/null; then
	say "creating .venv with $(grep -v '^#' "$req" | xargs)"
	python3 -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check -r "$req"
	cp "$req" .venv/.requirements
else
	say "Python venv .venv up to date"
fi

# The patched Unicorn that hvsim runs child VPs on (built once, cached).
say "patched Unicorn for hvsim (scripts/build-unicorn.sh)"
PYTHON=.venv/bin/python scripts/build-unicorn.sh | sed 's/^/setup: /'
say "kernels to build for: $(scripts/kernels.sh | xargs)"

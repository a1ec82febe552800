#!/usr/bin/env bash
# Build mshv_root.ko with W=1 for each installed Debian 12 kernel header set
# (6.1 and 6.12), each in its own copy of the sources under build/<kver>/,
# and fail on any compiler warning. Extra arguments go to kbuild (HVSIM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t kvers < <(scripts/kernels.sh)
if [ "${#kvers[@]}" -eq 0 ]; then
	echo "error: no Debian 6.1/6.12 amd64 kernel headers in /usr/src; run scripts/setup.sh" >&2
	exit 1
fi
for kver in "${kvers[@]}"; do
	kdir=/usr/src/linux-headers-$kver
	out=build/$kver
	case " $* " in *" HVSIM=1 "*) out=build/$kver-hvsim ;; esac
	echo "== building mshv_root.ko for $kver (W=1) $*"
	rm -rf "$out" && mkdir -p "$out"
	cp -r Kbuild mshv gen "$out/"
	log=$out/build.log
	check=()
	# sparse runs on every file when it is installed (C=1: files being built)
	if command -v sparse >/dev/null; then check=(C=1); fi
	if ! make -C "$kdir" M="$PWD/$out" W=1 "${check[@]}" "$@" modules >"$log" 2>&1; then
		cat "$log"; echo "error: build failed for $kver" >&2; exit 1
	fi
	if grep -E "warning:|error:" "$log"; then
		echo "error: compiler warnings for $kver (see $log)" >&2; exit 1
	fi
	modinfo "$out/mshv_root.ko" | grep -E "^(filename|vermagic|description|license|depends):" | sed 's/^/    /'
	echo "    size:        $(stat -c %s "$out/mshv_root.ko") bytes, no compiler${check:+ or sparse} warnings"
done

#!/usr/bin/env bash
# Print the installed Debian 12 amd64 kernel header versions the project
# builds against: the newest 6.1.0-N-amd64 and the newest 6.12.N+deb12-amd64.
set -euo pipefail
pick() { ls -d /usr/src/linux-headers-$1 2>/dev/null | sed 's|/usr/src/linux-headers-||' | sort -V | tail -n 1; }
for pat in '6.1.0-*-amd64' '6.12.*+deb12-amd64'; do
	v=$(pick "$pat" || true)
	[ -n "$v" ] && echo "$v"
done
exit 0

#!/bin/sh
# SPDX-License-Identifier: MIT
# make demo: build a sample disk (an ext4 filesystem filled from /usr/share,
# with real files and holes), convert it through every format this vdk
# supports, verify each result with qemu-img, and show vdk info.
set -eu
VDK=${1:-build/tools/vdk}
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/vdk-demo-XXXXXX")
trap 'rm -rf "$DIR"' EXIT

say() { printf '\n== %s\n' "$*"; }

say "Making a sample disk: 256 MiB ext4 image filled from /usr/share/doc"
if command -v mkfs.ext4 >/dev/null 2>&1; then
	mkfs.ext4 -q -F -d /usr/share/doc "$DIR/sample.raw" 256M
else
	"$VDK" create -q -f raw "$DIR/sample.raw" 256M
	"$VDK" io -f raw -c 'write -q -P 0x5a 1M 8M' -c 'write -q -P 0xa5 100M 3M' "$DIR/sample.raw"
fi
"$VDK" info "$DIR/sample.raw"

FORMATS=$("$VDK" --help | sed -n 's/^Supported formats: *//p')
prev="$DIR/sample.raw"
prev_fmt=raw
for fmt in $FORMATS; do
	# read-only formats (legacy qcow) cannot be conversion targets
	"$VDK" create -f "$fmt" -o help >/dev/null 2>&1 || continue
	out="$DIR/converted.$fmt"
	say "vdk convert -f $prev_fmt -O $fmt $(basename "$prev") $(basename "$out")"
	start=$(date +%s.%N)
	"$VDK" convert -p -f "$prev_fmt" -O "$fmt" "$prev" "$out"
	end=$(date +%s.%N)
	awk -v a="$start" -v b="$end" 'BEGIN { printf "took %.2f s\n", b - a }'
	echo "qemu-img compare against the original:"
	qemu-img compare -f raw -F "$fmt" "$DIR/sample.raw" "$out"
	if qemu-img check -f "$fmt" "$out" >/dev/null 2>&1; then
		echo "qemu-img check: no errors"
	else
		rc=$?
		[ "$rc" = 63 ] && echo "qemu-img check: $fmt has no metadata to check" || { echo "qemu-img check failed ($rc)"; exit 1; }
	fi
	"$VDK" info "$out"
	prev=$out
	prev_fmt=$fmt
done

say "Allocation map of the last image (vdk map, qemu-img map's format)"
"$VDK" map -f "$prev_fmt" "$prev" | head -n 8
say "Demo finished: every conversion verified by qemu-img."

#!/bin/sh
# A kernel or container that refuses io_uring must not be an error:
# aio=auto falls back to threads (and says why under -v); an explicit
# --aio=io_uring fails with a clear one-line message.
# usage: test-no-uring.sh NO_URING VDK
set -u
NOURING=$1
VDK=$2
D=$(mktemp -d "${TMPDIR:-/var/tmp}/vdk-nouring-XXXXXX")
trap 'rm -rf "$D"' EXIT
truncate -s 4M "$D/f.raw"
echo "1..3"
if ! "$VDK" --help | grep -q '^I/O engines.* io_uring'; then
	for i in 1 2 3; do echo "ok $i # SKIP io_uring is not compiled in or not usable here"; done
	exit 0
fi
out=$("$NOURING" "$VDK" -v io -f raw -c 'write -q -P 0x33 1000 3000' -c 'read -q -P 0x33 1000 3000' "$D/f.raw" 2>&1)
rc=$?
if [ $rc = 77 ]; then
	echo "ok 1 # SKIP seccomp unavailable"; echo "ok 2 # SKIP"; echo "ok 3 # SKIP"; exit 0
fi
if [ $rc = 0 ]; then echo "ok 1 - auto falls back when io_uring is refused"; else echo "not ok 1 - auto falls back (rc=$rc): $out"; fi
case "$out" in
*"io_uring unusable"*"threads"*) echo "ok 2 - -v says why the threads engine was chosen" ;;
*) echo "not ok 2 - -v reason missing: $out" ;;
esac
out=$("$NOURING" "$VDK" io --aio=io_uring -f raw -c 'read -q 0 512' "$D/f.raw" 2>&1)
rc=$?
lines=$(printf '%s\n' "$out" | wc -l)
case "$out" in
"vdk: $D/f.raw: io_uring: "*) [ $rc = 1 ] && [ "$lines" = 1 ] && echo "ok 3 - explicit io_uring fails with one clear line" ||
	echo "not ok 3 - rc=$rc lines=$lines: $out" ;;
*) echo "not ok 3 - unexpected: rc=$rc $out" ;;
esac

#!/bin/sh
# CLI error behaviour: one "vdk: FILE: ..." line and a non-zero exit; a
# conversion that fails or is interrupted leaves no target file behind.
# usage: test-cli-errors.sh VDK
set -u
VDK=$1
D=$(mktemp -d "${TMPDIR:-/var/tmp}/vdk-clierr-XXXXXX")
trap 'rm -rf "$D"' EXIT
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
nok() { n=$((n + 1)); echo "not ok $n - $1"; }
echo "1..7"

"$VDK" create -q -f raw "$D/src.raw" 64M
"$VDK" io -f raw -c 'write -q -P 0x11 0 8M' -c 'write -q -P 0x22 40M 8M' "$D/src.raw"

# 1-2: target write fails with ENOSPC (errno 28) on the 3rd write
out=$(VDK_FAULT=write:3:28 "$VDK" convert -f raw -O raw --aio=fault -m 2 "$D/src.raw" "$D/dst.raw" 2>&1)
rc=$?
case "$out" in
"vdk: $D/dst.raw: write failed at offset "*": No space left on device")
	[ $rc = 1 ] && [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && ok "ENOSPC reported in one line" || nok "rc=$rc: $out" ;;
*) nok "unexpected output (rc=$rc): $out" ;;
esac
[ ! -e "$D/dst.raw" ] && ok "failed convert leaves no target" || nok "target left behind"

# 3: read error on the source
out=$(VDK_FAULT=read:2:5 "$VDK" convert -f raw -O raw --aio=fault "$D/src.raw" "$D/dst2.raw" 2>&1)
rc=$?
case "$out" in
*"read failed at offset"*"Input/output error"*) [ $rc = 1 ] && [ ! -e "$D/dst2.raw" ] && ok "EIO on read reported, no target" || nok "rc=$rc" ;;
*) nok "unexpected: $out" ;;
esac

# 4: failed final flush is an error
out=$(VDK_FAULT=flush:1:5 "$VDK" convert -f raw -O raw --aio=fault "$D/src.raw" "$D/dst3.raw" 2>&1)
rc=$?
case "$out" in
*"flush failed"*) [ $rc = 1 ] && [ ! -e "$D/dst3.raw" ] && ok "failed flush fails the convert" || nok "rc=$rc" ;;
*) nok "unexpected: $out (rc=$rc)" ;;
esac

# 5: interrupted convert (SIGINT) removes its target
"$VDK" convert -f raw -O raw -r 4M "$D/src.raw" "$D/dst4.raw" >/dev/null 2>&1 &
pid=$!
sleep 1
kill -INT $pid
wait $pid
rc=$?
[ $rc != 0 ] && [ ! -e "$D/dst4.raw" ] && ok "SIGINT: non-zero exit, no target" || nok "SIGINT rc=$rc, exists=$([ -e "$D/dst4.raw" ] && echo yes || echo no)"

# 6: vdk io reports a failed write and exits 1
out=$(VDK_FAULT=write:1:5 "$VDK" io -f raw --aio=fault -c 'write -P 1 0 4k' "$D/src.raw" 2>&1)
rc=$?
[ $rc = 1 ] && case "$out" in *"write failed: Input/output error"*) true ;; *) false ;; esac &&
	ok "vdk io: write failure exits 1" || nok "vdk io: rc=$rc $out"

# 7: opening a missing file
out=$("$VDK" info "$D/missing.raw" 2>&1)
rc=$?
[ $rc = 1 ] && [ "$out" = "vdk: $D/missing.raw: cannot open: No such file or directory" ] &&
	ok "missing file: one line" || nok "rc=$rc: $out"

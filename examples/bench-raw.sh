#!/bin/sh
# SPDX-License-Identifier: MIT
# make bench: 4 KiB random reads at queue depth 32, O_DIRECT, on a 1 GiB
# raw file: vdk bench (io_uring) against fio (io_uring), alternating, five
# runs each, medians and their ratio.
set -eu
VDK=${1:-build/tools/vdk}
RUNS=${RUNS:-5}
SECS=${SECS:-5}
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/vdk-bench-XXXXXX")
trap 'rm -rf "$DIR"' EXIT
F="$DIR/bench.raw"
fio --name=fill --filename="$F" --size=1G --rw=write --bs=1M --ioengine=libaio --direct=1 --iodepth=8 >/dev/null
vdk_runs="" fio_runs=""
i=0
while [ $i -lt "$RUNS" ]; do
	v=$("$VDK" bench -f raw --aio=io_uring -t none --pattern=rand -d 32 --time="$SECS" --json "$F" |
		python3 -c 'import json,sys; print(int(json.load(sys.stdin)["iops"]))')
	f=$(fio --name=randread --filename="$F" --size=1G --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
		--direct=1 --runtime="$SECS" --time_based --output-format=json |
		python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
	echo "run $((i + 1)): vdk $v IOPS, fio $f IOPS"
	vdk_runs="$vdk_runs $v"
	fio_runs="$fio_runs $f"
	i=$((i + 1))
done
python3 - "$vdk_runs" "$fio_runs" <<'PY'
import statistics, sys
v = [int(x) for x in sys.argv[1].split()]
f = [int(x) for x in sys.argv[2].split()]
mv, mf = statistics.median(v), statistics.median(f)
print(f"median: vdk {mv:.0f} IOPS, fio {mf:.0f} IOPS, ratio {mv / mf:.3f}")
PY

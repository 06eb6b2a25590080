#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Summarise meson's test logs: every TAP subtest counts once, tests
without TAP count once by their result.  Prints failures, then the final
line "N passed, N failed, N skipped" over every log given, also written to
summary.txt next to the first.  Exit status 1 if anything failed.

    summary.py LOG [LABEL:LOG ...]   (a label prefixes that log's failures)"""
import json
import os
import re
import sys

args = sys.argv[1:] or ["build/meson-logs/testlog.json"]
log = args[0]
passed = failed = skipped = 0
failures = []

for arg in args:
    label, _, path = arg.rpartition(":") if not os.path.exists(arg) else ("", "", arg)
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            t = json.loads(line)
            name = (label + ": " if label else "") + t["name"]
            out = t.get("stdout") or ""
            plan = None
            seen = 0
            t_pass = t_fail = t_skip = 0
            bailed = False
            for l in out.splitlines():
                m = re.match(r"^1\.\.(\d+)", l)
                if m:
                    plan = int(m.group(1))
                    continue
                if l.startswith("Bail out!"):
                    bailed = True
                    failures.append(f"{name}: {l}")
                    continue
                m = re.match(r"^(not ok|ok)\b\s*\d*\s*-?\s*(.*)$", l)
                if not m:
                    continue
                seen += 1
                desc = m.group(2)
                directive = re.search(r"#\s*(SKIP|TODO)\b(.*)$", desc, re.I)
                if directive and directive.group(1).upper() == "SKIP":
                    t_skip += 1
                elif m.group(1) == "ok":
                    t_pass += 1
                elif directive and directive.group(1).upper() == "TODO":
                    t_skip += 1
                else:
                    t_fail += 1
                    failures.append(f"{name}: not ok {desc}")
            if plan is None and seen == 0:
                # not a TAP test: its exit status is the result
                res = t["result"]
                if res in ("OK", "EXPECTEDFAIL"):
                    passed += 1
                elif res == "SKIP":
                    skipped += 1
                else:
                    failed += 1
                    failures.append(f"{name}: {res}")
                continue
            missing = (plan - seen) if plan is not None and plan > seen else 0
            if missing:
                failures.append(f"{name}: {missing} planned test(s) never reported" + (" (bailed out)" if bailed else ""))
            t_fail += missing
            if t["result"] not in ("OK", "SKIP", "EXPECTEDFAIL") and t_fail == 0:
                t_fail = 1
                failures.append(f"{name}: {t['result']} (exit status {t.get('returncode')})")
            passed += t_pass
            failed += t_fail
            skipped += t_skip

if failures:
    print("Failures:")
    for f in failures:
        print("  " + f)
summary = f"{passed} passed, {failed} failed, {skipped} skipped"
try:
    with open(os.path.join(os.path.dirname(log), "summary.txt"), "w") as f:
        f.write(summary + "\n")
except OSError:
    pass
print(summary)
sys.exit(1 if failed else 0)

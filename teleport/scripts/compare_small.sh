#!/usr/bin/env bash
# Compares builds of `teleport` on small calls, alternating them so that the
# machine's slow and fast minutes fall on each alike (docs/performance.md,
# "Fewer allocations and machine steps per call").
#
#   teleport/scripts/compare_small.sh RUNS BINARY...
#
# For each run and each binary: `BINARY bench --only small --json`, and one
# line per 1 and 64 calls in flight: calls/s, the ratio to bare quinn in the
# same run, p50, and the CPU per call of both processes against bare quinn's.
set -euo pipefail
runs=$1
shift
for _ in $(seq 1 "$runs"); do
  for binary in "$@"; do
    "$binary" bench --only small --json 2>/dev/null | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    r = json.loads(line)
    if r["case"] != "small" or r["inflight"] not in (1, 64):
        continue
    ours = r["client_cpu_us_per_call"] + r["server_cpu_us_per_call"]
    quinn = r["reference_client_cpu_us_per_call"] + r["reference_server_cpu_us_per_call"]
    print("%-24s %3d in flight: %7.0f calls/s, %.2fx quinn, p50 %5.0f us (quinn %5.0f), "
          "CPU %5.1f us/call (quinn %5.1f)" % (
              name, r["inflight"], r["calls_per_s"], r["ratio"], r["p50_us"],
              r["reference_p50_us"], ours, quinn))
' "$(basename "$binary")"
  done
done

#!/usr/bin/env bash
# The outage harness at full size: the bucket (a single-node Garage) is unreachable for
# SECS seconds while a writer fsyncs files through the mount; then it comes back, and every
# acknowledged write must reach it (tests/outage.rs). Prints one summary line: outage
# seconds, acknowledged fsyncs and bytes during it, the slowest write, how long a read of
# uncached data took to fail, how long the drain took after recovery.
#   usage: benches/outage.sh [SECS] [MODE]
#   SECS defaults to 300 (a 5-minute outage); MODE is down (default: Garage is killed,
#   connections are refused) or hang (a listener on its port accepts and never answers).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export AUTOSYNC_OUTAGE_SECS=${1:-300}
export AUTOSYNC_OUTAGE_MODE=${2:-down}
cd "$root"
cargo test --release --test outage -- --nocapture 2>&1 | grep -E -A3 '^outage harness|panicked|keeping|test result'

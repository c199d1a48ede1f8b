#!/usr/bin/env bash
# The crash harness at full size: SIGKILL the daemon KILLS times at random moments while a
# writer fsyncs self-checking files, then check that no acknowledged write was lost and no
# partial object was ever visible (tests/crash.rs). Prints one summary line: kills,
# acknowledged fsyncs, bytes lost.
#   usage: benches/crash.sh [KILLS] [BACKEND] [SEED]
#   KILLS defaults to 200; BACKEND is local (default), moto, garage or garage3; SEED
#   defaults to the time, and is printed so a failing run can be repeated.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export AUTOSYNC_CRASH_KILLS=${1:-200}
export AUTOSYNC_CRASH_BACKEND=${2:-local}
export AUTOSYNC_CRASH_SEED=${3:-$(date +%s)}
cd "$root"
cargo test --release --test crash -- --nocapture 2>&1 | grep -E -A3 '^crash harness|panicked|keeping|test result'

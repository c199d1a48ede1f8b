#!/usr/bin/env bash
# Small-file workload on a local-folder mount, next to the same workload on a plain local
# folder in the same run: create N files, list them with `ls -l`, read them back, and flush
# everything to the bucket. Prints seconds and the ratio to the local folder.
#   usage: benches/smallfiles.sh [N]   (builds the release binary if needed)
set -euo pipefail
N=${1:-1000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/release/autosync"
[ -x "$bin" ] || (cd "$root" && cargo build --release --quiet)
work=$(mktemp -d)
trap '"$bin" unmount "$work/mnt" --state-dir "$work/state" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/mnt" "$work/plain"
"$bin" mount "$work/bucket" "$work/mnt" --state-dir "$work/state" --cache-dir "$work/cache" --daemon

secs() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }
create() { for i in $(seq "$N"); do echo "file $i" > "$1/f$i"; done; }
list() { ls -l "$1" > /dev/null; }
readall() { cat "$1"/f* > /dev/null; }

printf '%-28s %10s %10s %8s\n' "job ($N files)" "mount s" "local s" "ratio"
for job in create list readall; do
  m=$(secs $job "$work/mnt"); l=$(secs $job "$work/plain")
  printf '%-28s %10.3f %10.3f %8.1f\n' "$job" "$m" "$l" "$(echo "$m / $l" | bc -l)"
done
f=$(secs "$bin" flush "$work/mnt" --state-dir "$work/state")
printf '%-28s %10.3f\n' "flush to bucket" "$f"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r)"

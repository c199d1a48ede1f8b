#!/usr/bin/env bash
# Whether a listener of the event stream that reads nothing slows the mount down: creates N
# small files (a shell loop, each `echo > file`, so create + write + close + fsync'd
# journal) in a local-folder mount, without a listener and with `autosync events` piped
# into a reader that never reads, alternating ROUNDS times, and prints the seconds of each
# and the medians. Then reads what the stalled listener got and shows the `lagged` count.
#   usage: benches/events.sh [N] [ROUNDS]      (defaults 10000 and 3; release build needed)
set -euo pipefail
N=${1:-10000}
ROUNDS=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${AUTOSYNC_BIN:-$root/target/release/autosync}
[ -x "$bin" ] || { echo "benches/events.sh: no release build at $bin: cargo build --release" >&2; exit 1; }
work=$(mktemp -d /var/tmp/autosync-events.XXXXXX)
listener=""
cleanup() {
  set +e
  [ -n "$listener" ] && kill "$listener" 2> /dev/null
  "$bin" unmount "$work/mnt" --state-dir "$work/state" > /dev/null 2>&1 || umount -l "$work/mnt" 2> /dev/null
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt"
"$bin" mount "$work/bucket" "$work/mnt" --state-dir "$work/state" --cache-dir "$work/cache" --daemon 2> "$work/daemon.log"

secs() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }
create() { mkdir "$1"; for i in $(seq "$N"); do echo "file $i" > "$1/f$i"; done; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r); load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "autosync: $bin, HEAD $(git -C "$root" log -1 --format=%h 2> /dev/null || echo '?')"
printf '%-8s %14s %22s\n' round "no listener s" "stalled listener s"
: > "$work/none"; : > "$work/stalled"
for r in $(seq "$ROUNDS"); do
  a=$(secs create "$work/mnt/none-$r")
  "$bin" flush "$work/mnt" --state-dir "$work/state" > /dev/null
  # A listener that reads nothing: `autosync events` writes into a FIFO nobody reads, so it
  # stops reading the socket once the FIFO's 64 KiB are full.
  rm -f "$work/fifo"; mkfifo "$work/fifo"
  exec 3<> "$work/fifo"
  "$bin" events "$work/mnt" --state-dir "$work/state" --json > "$work/fifo" &
  listener=$!
  b=$(secs create "$work/mnt/stalled-$r")
  "$bin" flush "$work/mnt" --state-dir "$work/state" > /dev/null
  # Now read what it has: the events it could keep, then a `lagged` line with the count.
  timeout 5 cat <&3 > "$work/got-$r" || true
  kill "$listener" 2> /dev/null; wait "$listener" 2> /dev/null || true; listener=""
  exec 3>&-
  lagged=$(grep -c '"kind":"lagged"' "$work/got-$r" || true)
  missed=$(grep -o '"missed":[0-9]*' "$work/got-$r" | cut -d: -f2 | paste -sd+ | bc)
  printf '%-8s %14.2f %22.2f   (listener: %s lines read, %s lagged, %s missed)\n' "$r" "$a" "$b" \
    "$(wc -l < "$work/got-$r")" "$lagged" "${missed:-0}"
  echo "$a" >> "$work/none"; echo "$b" >> "$work/stalled"
done
m1=$(median < "$work/none"); m2=$(median < "$work/stalled")
printf 'median   %14.2f %22.2f   ratio %.2f\n' "$m1" "$m2" "$(echo "$m2 / $m1" | bc -l)"

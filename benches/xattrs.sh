#!/usr/bin/env bash
# What answering extended attributes costs: on a local-folder bucket, `ls -l` of one folder
# of N files (first listing, then again past the kernel's 1 s attribute TTL), the xattr
# calls `ls -l` makes (strace), and a loop of 4 KiB writes (dd, 10,000 of them), whose each
# write makes the kernel ask for `security.capability`. Each build runs REPEAT times,
# alternating, best figure kept.
#   usage (as root): benches/xattrs.sh
#   N=10000           files in the folder
#   REPEAT=3          runs per build
#   AUTOSYNC_BIN=PATH another build than target/release/autosync
#   BEFORE_BIN=PATH   also an earlier build, in the same run
#   KEEP=1            keep the work dir (/var/tmp/autosync-xattrs.*) and its logs
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
me=benches/xattrs.sh
source "$root/benches/lib.sh"

N=${N:-10000}
REPEAT=${REPEAT:-3}
[ "$(id -u)" = 0 ] || die "run it as root (it mounts)"
[[ "$N" =~ ^[1-9][0-9]*$ && "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "N and REPEAT must be whole numbers"
need bc; need strace; need findmnt util-linux
bin=${AUTOSYNC_BIN:-$root/target/release/autosync}
[ -x "$bin" ] || die "no build at $bin: cargo build --release (or set AUTOSYNC_BIN)"
builds=(autosync)
work=$(mktemp -d /var/tmp/autosync-xattrs.XXXXXX)
cp "$bin" "$work/autosync"
if [ -n "${BEFORE_BIN:-}" ]; then
  [ -x "$BEFORE_BIN" ] || die "BEFORE_BIN=$BEFORE_BIN is not an executable"
  cp "$BEFORE_BIN" "$work/before"; builds+=(before)
fi
mnt=$work/mnt
cleanup() {
  set +e
  findmnt -rn "$mnt" > /dev/null && { umount "$mnt" 2> /dev/null || umount -l "$mnt"; }
  drop_work
}
trap cleanup EXIT
mkdir -p "$mnt" "$work/files"
for i in $(seq 1 "$N"); do echo "$i" > "$work/files/f$i"; done
secs() { local s; s=$(now); "$@" > /dev/null; echo "scale=3; ($(now) - $s) / 1" | bc -l | sed 's/^\./0./'; }
best() { printf '%s\n' "$@" | sort -n | head -1; }
declare -A cold again writes calls
start_load=$(load_now)
for r in $(seq 1 "$REPEAT"); do
  for b in "${builds[@]}"; do
    run=$work/$b-$r
    mkdir -p "$run/bucket/big"
    cp -a "$work/files/." "$run/bucket/big/"
    "$work/$b" mount "$run/bucket" "$mnt" --state-dir "$run/state" --cache-dir "$run/cache" \
      --metadata-ttl 300 --poll-interval 0 --daemon 2> "$run/log"
    cold[$b]+=" $(secs ls -l "$mnt/big")"
    sleep 1.1   # past the kernel's attribute TTL: the next ls asks the daemon again
    again[$b]+=" $(secs ls -l "$mnt/big")"
    strace -f -c -e trace=lgetxattr,getxattr,llistxattr,listxattr -o "$run/strace" ls -l "$mnt/big" > /dev/null
    calls[$b]=$(awk '$NF == "total" {print $4}' "$run/strace")
    writes[$b]+=" $(secs dd if=/dev/zero of="$mnt/w" bs=4k count=10000 status=none)"
    umount "$mnt"
  done
done
echo
echo "extended attributes on a local-folder bucket, $(date +%F); seconds, best of $REPEAT"
echo "| build    | ls -l $N, first | ls -l again | xattr calls of one ls -l | 10,000 writes of 4 KiB |"
echo "|----------|-----------------|-------------|--------------------------|------------------------|"
for b in "${builds[@]}"; do
  # shellcheck disable=SC2086
  printf '| %-8s | %15s | %11s | %24s | %22s |\n' "$b" "$(best ${cold[$b]})" "$(best ${again[$b]})" \
    "${calls[$b]:-0}" "$(best ${writes[$b]})"
done
echo
echo "machine: $(machine)"
echo "load average at start: $start_load"
echo "load average at end:   $(load_now)"

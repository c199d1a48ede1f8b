#!/usr/bin/env bash
# How `ls -l` of a big folder grows with its size: one folder on a single-node Garage on
# loopback filled to each of SIZES entries in turn; at each size, autosync lists it cold (new
# state dir, empty page cache), again (within the metadata TTL), and after a remount (same
# state dir, empty page cache); s3fs on the same folder at S3FS_SIZES, cold and again. Prints
# one table with the times and the cost per entry (flat: linear growth), the ratio to s3fs,
# the daemon's peak RSS, the machine and the load average.
#   usage (as root): benches/bigdir.sh
#   SIZES="10000 50000 100000"   the folder sizes, increasing (default)
#   S3FS_SIZES="50000"           sizes s3fs lists too (empty: none)
#   TTL=300                      autosync's --metadata-ttl; "again" must start within it
#   REPEAT=1                     measure each build this many times (each cold with a new
#                                state dir), alternating them, and keep the best of each figure
#   AUTOSYNC_BIN=PATH            another build than target/release/autosync
#   BEFORE_BIN=PATH              also an earlier build, at each size, in the same run
#   KEEP=1                       keep the work dir (/var/tmp/autosync-bigdir.*) and its logs
# The objects carry s3fs-style attributes (x-amz-meta-mode), put by rclone (64 at once).
# Needs rclone, s3fs, bc, garage ($AUTOSYNC_GARAGE, else ~/.cargo/bin/garage). About 10
# minutes at the default sizes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
me=benches/bigdir.sh
source "$root/benches/lib.sh"

SIZES=${SIZES:-10000 50000 100000}
S3FS_SIZES=${S3FS_SIZES-50000}
TTL=${TTL:-300}
REPEAT=${REPEAT:-1}
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a whole number of runs, not '$REPEAT'"
[ "$(id -u)" = 0 ] || die "run it as root (it mounts, and writes /proc/sys/vm/drop_caches)"
[ -e /dev/fuse ] || die "no /dev/fuse: modprobe fuse (in a container: --device /dev/fuse)"
need rclone; need s3fs; need bc; need findmnt util-linux
find_garage
prev=0
for n in $SIZES; do
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt "$prev" ] || die "SIZES must be whole numbers, increasing: '$SIZES'"
  prev=$n
done
for n in $S3FS_SIZES; do [[ " $SIZES " == *" $n "* ]] || die "S3FS_SIZES must be among SIZES: '$n'"; done
bin=${AUTOSYNC_BIN:-$root/target/release/autosync}
if [ ! -x "$bin" ]; then
  [ -z "${AUTOSYNC_BIN:-}" ] || die "AUTOSYNC_BIN=$bin is not an executable: build it or unset AUTOSYNC_BIN"
  echo "$me: no release build, building it: cargo build --release" >&2
  (cd "$root" && cargo build --release --quiet) || die "cargo build --release failed: fix the build, or set AUTOSYNC_BIN"
fi

work=$(mktemp -d /var/tmp/autosync-bigdir.XXXXXX)
mkdir -p "$work/mnt" "$work/files" "$work/log"
cp "$bin" "$work/autosync"; bin_src=$bin; bin=$work/autosync   # a rebuild meanwhile changes nothing
builds=(autosync)
if [ -n "${BEFORE_BIN:-}" ]; then
  [ -x "$BEFORE_BIN" ] || die "BEFORE_BIN=$BEFORE_BIN is not an executable"
  cp "$BEFORE_BIN" "$work/before"; builds+=(before)
fi
mpid=""
cleanup() {
  set +e
  findmnt -rn "$work/mnt" > /dev/null && { umount "$work/mnt" 2> /dev/null || umount -l "$work/mnt"; }
  [ -n "$mpid" ] && kill "$mpid" 2> /dev/null
  stop_garage
  drop_work
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load_start=$(load_now)
start_garage "$work/garage"
garage_bucket big
echo "$key_id:$secret" > "$work/s3fs.passwd"; chmod 600 "$work/s3fs.passwd"
rclone_remote g "$endpoint"

# fill N: the folder big/d holds f0000001..fN (100 bytes each, mode 0644 in s3fs's metadata)
filled=0
fill() {
  local n=$1 s e
  rm -rf "$work/files"; mkdir -p "$work/files"
  (cd "$work/files" && seq -f 'f%07.0f' $((filled + 1)) "$n" | xargs -r -n 5000 sh -c \
    'for f; do printf "%0100d" 0 > "$f"; done' sh)
  s=$(now)
  rclone copy "$work/files" g:big/d --transfers 64 --checkers 64 --no-check-dest --s3-no-check-bucket \
    --header-upload "x-amz-meta-mode: 33188" --log-level ERROR 2> "$work/log/rclone.$n" ||
    die "rclone could not fill the folder: $(tail -2 "$work/log/rclone.$n")"
  e=$(now)
  echo "  filled to $n entries in $(since "$e" "$s") s" >&2
  filled=$n
}
since() { echo "scale=2; ($1 - $2) / 1" | bc | sed 's/^\./0./'; }
alive() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2> /dev/null; }

# mount TOOL STATE: TOOL at $work/mnt (autosync with the state and cache dirs STATE); sets mpid
mount_tool() {
  case $1 in
    autosync | before)
      "$work/$1" mount "s3://big" "$work/mnt" --endpoint "$endpoint" --allow-http --region garage \
        --metadata-ttl "$TTL" --state-dir "$work/$2/state" --cache-dir "$work/$2/cache" \
        >> "$work/log/$1.log" 2>&1 & ;;
    s3fs)
      s3fs big "$work/mnt" -f -o "url=$endpoint,use_path_request_style,endpoint=garage" \
        -o "passwd_file=$work/s3fs.passwd,dbglevel=warn" >> "$work/log/s3fs.log" 2>&1 & ;;
  esac
  mpid=$!
  for _ in $(seq 600); do
    findmnt -rn "$work/mnt" > /dev/null && return 0
    alive "$mpid" || die "$1 did not mount: see $work/log/$1.log"
    sleep 0.05
  done
  die "$1 did not mount within 30 s: see $work/log/$1.log"
}
unmount_tool() {
  if [ "$1" != s3fs ]; then
    timeout 90 "$work/$1" unmount "$work/mnt" --state-dir "$work/$2/state" > /dev/null 2>&1 ||
      die "autosync unmount failed: see $work/log/$1.log"
  else
    umount "$work/mnt" || die "cannot unmount s3fs"
  fi
  for _ in $(seq 1200); do alive "$mpid" || { wait "$mpid" 2> /dev/null || true; mpid=""; return 0; }; sleep 0.05; done
  die "$1 ($mpid) still ran 60 s after its unmount"
}
# ls_l N: the seconds `ls -l` of the folder takes; fails unless it shows N files
ls_l() {
  local s e c
  s=$(now); c=$(ls -l "$work/mnt/d" | grep -c '^-') || true; e=$(now)
  [ "$c" = "$1" ] || die "ls -l showed $c files, not $1 (see $work/log)"
  since "$e" "$s"
}
hwm() { awk '/VmHWM/{print int($2 / 1024)}' "/proc/$1/status"; }   # peak RSS, MiB

declare -A res pairs
# keep KEY VALUE: res[KEY] becomes VALUE if it is the first or the lowest so far
keep() { if [ -z "${res[$1]:-}" ] || [ "$(echo "$2 < ${res[$1]}" | bc)" = 1 ]; then res[$1]=$2; fi; }
for n in $SIZES; do
  fill "$n"
  for r in $(seq "$REPEAT"); do
    for b in "${builds[@]}"; do
      tag=$b.$n.$r
      mount_tool "$b" "$tag"; drop_caches
      t=$(ls_l "$n"); keep "$b.$n.cold" "$t"; keep "$b.$n.again" "$(ls_l "$n")"
      if [ "$b" = autosync ]; then last_cold=$t; fi
      keep "$b.$n.cpu" "$(cpu_of "$mpid")"
      unmount_tool "$b" "$tag"
      drop_caches
      mount_tool "$b" "$tag"
      keep "$b.$n.remount" "$(ls_l "$n")"; keep "$b.$n.rss" "$(hwm "$mpid")"
      unmount_tool "$b" "$tag"
      rm -rf "${work:?}/$tag"
      echo "  $n: $b best of $r: ${res[$b.$n.cold]} s cold, ${res[$b.$n.again]} s again, ${res[$b.$n.remount]} s after a remount" >&2
    done
    if [[ " $S3FS_SIZES " == *" $n "* ]]; then
      mount_tool s3fs -; drop_caches
      t=$(ls_l "$n"); keep "s3fs.$n" "$t"; keep "s3fs.$n.again" "$(ls_l "$n")"
      # each round's ratio to autosync's cold run of the same round: the load changes between rounds
      pairs[$n]+=" $(ratio "$t" "$last_cold")"
      unmount_tool s3fs -
      echo "  $n: s3fs best of $r: ${res[s3fs.$n]} s cold, ${res[s3fs.$n.again]} s again" >&2
    fi
  done
done
load_end=$(load_now)

us() { echo "scale=0; $1 * 1000000 / $2" | bc; }   # us SECONDS N: microseconds per entry
echo
echo "ls -l of one folder on a single-node Garage (loopback), $(date +%F); seconds (µs per entry), best of $REPEAT"
printf '| %-8s | %8s | %-16s | %-16s | %-16s | %-9s | %-10s | %-12s | %-7s |\n' build entries cold again \
  "after remount" "s3fs cold" "s3fs again" "s3fs / cold" "RSS MiB"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ---------- ------------------ ------------------ \
  ------------------ ----------- ------------ -------------- ---------
for b in "${builds[@]}"; do
  for n in $SIZES; do
    c=${res[$b.$n.cold]} a=${res[$b.$n.again]} r=${res[$b.$n.remount]}
    s=${res[s3fs.$n]:--} sa=${res[s3fs.$n.again]:--} q=-
    [ "$s" != - ] && q=$(ratio "$s" "$c")
    printf '| %-8s | %8s | %-16s | %-16s | %-16s | %-9s | %-10s | %-12s | %-7s |\n' "$b" "$n" \
      "$c ($(us "$c" "$n"))" "$a ($(us "$a" "$n"))" "$r ($(us "$r" "$n"))" "$s" "$sa" "$q" "${res[$b.$n.rss]}"
  done
done
echo
for b in "${builds[@]}"; do
  echo "$b: daemon CPU during a first mount (cold + again), least:$(for n in $SIZES; do printf ' %s: %s s' "$n" "${res[$b.$n.cpu]}"; done)"
done
for n in $S3FS_SIZES; do echo "s3fs cold / autosync cold, run by run at $n:${pairs[$n]}"; done
echo "autosync --metadata-ttl $TTL (\"again\" is within it); RSS: the daemon's peak after the remount's ls -l"
echo "machine: $(machine)"
echo "builds: autosync $bin_src ($(date -r "$bin_src" "+%F %T"), HEAD $(git -C "$root" log -1 --format=%h 2> /dev/null))${BEFORE_BIN:+; before $BEFORE_BIN ($(date -r "$BEFORE_BIN" "+%F %T"))}; s3fs $(s3fs --version 2>&1 | grep -o 'V[0-9.]*' | head -1); garage $("$garage" --version | awk '{print $2}')"
echo "load average at start: $load_start"
echo "load average at end:   $load_end"

#!/usr/bin/env bash
# Reads (and one write) through the block cache, with fio, on a mount over a single-node Garage
# on loopback, next to the same fio jobs on a plain local folder and a raw download of the same
# 1 GiB object by two other S3 clients (rclone, boto3), all measured in the same run. Prints
# MB/s (10^6 bytes/s) for each job with the CPU seconds the daemon and Garage used during it,
# the daemon's peak RSS while it reads 4 GiB, `autosync cache stats` after the disk-cache read,
# and the ratios against the targets of issue 4.
#   usage (as root): benches/fio.sh
#   AUTOSYNC_BIN=PATH benches/fio.sh   (another build than target/release/autosync)
# Needs fio, garage ($AUTOSYNC_GARAGE, else ~/.cargo/bin/garage, else PATH), rclone, jq and a
# release build; it installs none of them. About 4 minutes on 2 cores, 4 GiB of disk in /var/tmp.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${AUTOSYNC_BIN:-$root/target/release/autosync}   # AUTOSYNC_BIN: another build
me=benches/fio.sh
source "$root/benches/lib.sh"

[ "$(id -u)" = 0 ] || die "run it as root (it mounts, and writes /proc/sys/vm/drop_caches)"
need fio; need rclone; need jq; need bc
find_garage
[ -x "$bin" ] || die "no release build at $bin: cargo build --release"
python=$root/.ci/venv/bin/python
"$python" -c 'import boto3' 2> /dev/null || python=""   # boto3 reference is optional

work=$(mktemp -d /var/tmp/autosync-fio.XXXXXX)
mnt="$work/mnt"
sampler_pid=""
cleanup() {
  set +e
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2> /dev/null
  if mountpoint -q "$mnt"; then
    timeout 60 "$bin" unmount "$mnt" --state-dir "$work/state" > /dev/null 2>&1 || umount -l "$mnt"
  fi
  stop_garage
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
GiB=$((1 << 30))

# ---- a single-node Garage (benches/lib.sh) --------------------------------------------------
mkdir -p "$mnt" "$work/plain"
start_garage "$work/garage"
bucket=bench
garage_bucket "$bucket"
# rclone's remote `gar:` from the environment.
rclone_remote gar "$endpoint"

# ---- the 1 GiB object (random data), put by rclone; the same bytes in a plain folder ------
head -c $GiB /dev/urandom > "$work/plain/file"
rclone -q copyto "$work/plain/file" gar:$bucket/file --s3-upload-concurrency 4 ||
  die "rclone could not put the object: $(tail -3 "$work/garage/log")"

# ---- helpers -------------------------------------------------------------------------------
mount_fs() {   # mount_fs CACHE_DIR [FLAGS...]: mounts the bucket at $mnt; sets $pid
  local cache=$1; shift
  "$bin" mount "s3://$bucket" "$mnt" --endpoint "$endpoint" --allow-http --region garage \
    --state-dir "$work/state" --cache-dir "$cache" --cache-size 4G --daemon "$@" > /dev/null
  pid=$(pgrep -n -f "mount s3://$bucket $mnt ") || die "cannot find the daemon's pid"
}
# `autosync unmount` returns once the mountpoint is gone, but the daemon lives on for a moment
# (about 1.5 s here) holding the state dir's lock, and removes control.sock when it exits: wait
# for it, or the next mount on the same state dir fails or loses its control socket.
unmount_fs() {
  "$bin" unmount "$mnt" --state-dir "$work/state" > /dev/null
  for _ in $(seq 600); do kill -0 "$pid" 2> /dev/null || return 0; sleep 0.05; done
  die "the daemon ($pid) still runs 30 s after autosync unmount"
}
mark() { c0=$(cpu_of "$pid"); g0=$(cpu_of "$garage_pid"); }   # before a job: CPU of daemon, Garage
# fio_job NAME FILE ARGS...: runs one fio job, sets $mb (MB/s) and $iops. --invalidate=0: the
# job itself never drops the file's page cache; the caller decides (drop_caches or not).
fio_job() {
  local name=$1 file=$2 out; shift 2
  out=$(fio --name="$name" --filename="$file" --ioengine=psync --direct=0 --invalidate=0 \
    --numjobs=1 --output-format=json "$@") || die "fio $name failed"
  local rw=read; [[ " $* " == *" --rw=write "* ]] && rw=write
  mb=$(jq -r ".jobs[0].$rw.bw_bytes / 1000000 | . * 10 | round / 10" <<< "$out")
  iops=$(jq -r ".jobs[0].$rw.iops | round" <<< "$out")
}
seq_read() { fio_job seq "$1" --rw=read --bs=1M --size=1G --readonly; iops=""; }
# 10,000 reads at the same random offsets each time (randrepeat), so a second run reads only
# what the first one cached
rand_read() { fio_job rand "$1" --rw=randread --bs=4k --size=1G --readonly --number_ios=10000 --randrepeat=1; }
seq_write() { fio_job write "$1" --rw=write --bs=1M --size=1G --end_fsync=1 --fallocate=none; iops=""; }
row() { printf '%-56s %8s %8s %8s %8s\n' "$1" "$2" "${3:-}" "${4:-}" "${5:-}"; }
used() { printf '%.1f' "$(echo "$(cpu_of "$1") - $2" | bc)"; }
# mrow LABEL: a row for a job on the mount, with the CPU seconds of the daemon and Garage since `mark`
mrow() { row "$1" "$mb" "$iops" "$(used "$pid" "$c0")" "$(used "$garage_pid" "$g0")"; }

echo "machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)," \
  "$(free -g | awk '/Mem/{print $2}') GiB RAM, $(uname -r), fio $(fio --version | sed 's/fio-//')," \
  "garage $("$garage" --version | awk '{print $2}')"
echo "autosync: $bin, built $(date -r "$bin" "+%F %T"); HEAD of $root: $(git -C "$root" log -1 --format=%h)"
echo "load average at start: $(load_now)"
echo
echo "MB/s = 10^6 bytes/s; daemon, Garage: CPU seconds each used during the job"
row "job" "MB/s" "IOPS" "daemon" "Garage"

# ---- references: another S3 client, and the plain local folder ------------------------------
drop_caches; g0=$(cpu_of "$garage_pid"); s=$(now)
rclone -q cat gar:$bucket/file > /dev/null; raw_rclone=$(mbps $GiB "$(now) - $s")
row "raw download, rclone cat (one GET), cold" "$raw_rclone" "" "" "$(used "$garage_pid" "$g0")"
raw_best=$raw_rclone
if [ -n "$python" ]; then
  drop_caches; g0=$(cpu_of "$garage_pid"); s=$(now)
  "$python" - "$endpoint" "$bucket" << 'EOF'
import os, sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], config=Config(s3={"addressing_style": "path"}))
with open(os.devnull, "wb") as f:
    s3.download_fileobj(sys.argv[2], "file", f)
EOF
  raw_boto3=$(mbps $GiB "$(now) - $s")
  row "raw download, boto3 (10 x 8 MiB ranges), cold" "$raw_boto3" "" "" "$(used "$garage_pid" "$g0")"
  [ "$(echo "$raw_boto3 > $raw_best" | bc)" = 1 ] && raw_best=$raw_boto3
fi
drop_caches; seq_read "$work/plain/file"; local_cold=$mb
row "local folder, seq read 1M, cold (drop_caches)" "$mb"
best3() { local b=0; for _ in 1 2 3; do seq_read "$1"; [ "$(echo "$mb > $b" | bc)" = 1 ] && b=$mb; done; mb=$b; }
best3 "$work/plain/file"; local_warm=$mb   # about 0.15 s a read: the best of 3
row "local folder, seq read 1M, page cache (best of 3)" "$mb"
drop_caches; rand_read "$work/plain/file"
row "local folder, rand read 4k x 10k, cold" "$mb" "$iops"
rand_read "$work/plain/file"
row "local folder, rand read 4k x 10k, after the above" "$mb" "$iops"
seq_write "$work/plain/new"; local_write=$mb
row "local folder, seq write 1 GiB + fsync" "$mb"
rm -f "$work/plain/new"

# ---- the mount: cold, warm, and from the disk cache after a remount -------------------------
mount_fs "$work/cache1"
drop_caches; mark; seq_read "$mnt/file"; cold=$mb
mrow "mount, seq read 1M, cold (fresh cache)"
mark; best3 "$mnt/file"; warm=$mb
mrow "mount, seq re-read, same mount (KEEP_CACHE; best of 3)"
unmount_fs
drop_caches
mount_fs "$work/cache1"
mark; seq_read "$mnt/file"; disk=$mb
mrow "mount, seq read after remount (disk cache)"
echo "--- autosync cache stats after the disk-cache read:"
"$bin" cache stats "$mnt" --state-dir "$work/state" | sed 's/^/    /'
echo "---"
unmount_fs

# ---- random 4k: cold on a fresh mount and cache, then again from the block cache (page cache
# dropped); the same with --block-size 64K further down, to see what a 1 MiB block costs a 4k read
rm -rf "$work/state"
mount_fs "$work/cache2"
drop_caches; mark; rand_read "$mnt/file"
mrow "mount, rand read 4k x 10k, cold (fresh cache)"
drop_caches; mark; rand_read "$mnt/file"
mrow "mount, rand read 4k x 10k, again (block cache)"
unmount_fs

# ---- the same random 4k jobs with 64 KiB blocks ---------------------------------------------
rm -rf "$work/state"
mount_fs "$work/cache-rand-64K" --block-size 64K
drop_caches; mark; rand_read "$mnt/file"
mrow "mount --block-size 64K, rand read 4k x 10k, cold"
drop_caches; mark; rand_read "$mnt/file"
mrow "mount --block-size 64K, rand read 4k x 10k, again"
unmount_fs

# ---- peak RSS while reading 4 GiB: 4 x 1 GiB, page cache and block cache emptied between ---
rm -rf "$work/state" "$work"/cache*
mount_fs "$work/cache3"
( peak=0; while kill -0 "$pid" 2> /dev/null; do
    r=$(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2> /dev/null || echo 0)
    [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" > "$work/rss_peak"
    sleep 0.1; done ) &
sampler_pid=$!
mark; s=$(now)
for _ in 1 2 3 4; do
  drop_caches; "$bin" cache clear "$mnt" --state-dir "$work/state" > /dev/null
  cat "$mnt/file" > /dev/null
done
mb=$(mbps $((4 * GiB)) "$(now) - $s") iops=""
hwm_kib=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
kill "$sampler_pid"; wait "$sampler_pid" 2> /dev/null || true; sampler_pid=""
hwm=$((hwm_kib / 1024))
mrow "mount, 4 x 1 GiB cold read (cat), sampling RSS"
echo "daemon peak RSS (VmHWM, whole life of the mount): $hwm MiB;" \
  "highest VmRSS sampled every 0.1 s: $(( $(cat "$work/rss_peak") / 1024 )) MiB"
unmount_fs

# ---- sequential write of a new 1 GiB file, then the upload (last: Garage keeps working on the
# new object for a while after it, which would disturb the read jobs) -----------------------
rm -rf "$work/state" "$work"/cache*
mount_fs "$work/cache4"
mark; seq_write "$mnt/new"; mwrite=$mb
mrow "mount, seq write 1 GiB + fsync (new file)"
mark; s=$(now); "$bin" flush "$mnt" --state-dir "$work/state" --timeout 600 > /dev/null
t=$(echo "$(now) - $s" | bc); mb=$(mbps $GiB "$t") iops=""
mrow "autosync flush of it ($(printf '%.1f' "$t") s)"
unmount_fs

echo
echo "load average at end: $(load_now)"
echo
echo "targets (issue 4):"
printf '  %-56s %s\n' \
  "re-read warm / local page-cache read >= 0.5:" "$warm / $local_warm = $(ratio "$warm" "$local_warm")" \
  "disk-cache read after remount >= 700 MB/s:" "$disk MB/s = $(ratio "$disk" 700) x 700" \
  "cold read / raw download (fastest client) >= 0.8:" "$cold / $raw_best = $(ratio "$cold" "$raw_best")" \
  "peak RSS reading 4 GiB < 300 MiB:" "$hwm MiB = $(ratio "$hwm" 300) x 300"
echo "other ratios:"
printf '  %-56s %s\n' \
  "cold read / local cold read:" "$(ratio "$cold" "$local_cold")" \
  "seq write / local seq write:" "$(ratio "$mwrite" "$local_write")"

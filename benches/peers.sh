#!/usr/bin/env bash
# autosync next to rclone mount (--vfs-cache-mode full) and s3fs, in one run, on the same
# single-node Garage: over loopback, and over a "WAN" (the same Garage behind
# examples/delay_proxy.rs, DELAY_MS each way). Each row is one workload run on each mount, with
# a reference (a raw S3 client, or the local disk) or a limit beside it; prints one table, with
# the ratio of autosync to the best peer (> 1: autosync is better), the machine and the load.
# Times that end "until the bucket holds it" are measured by polling the bucket directly over
# loopback (boto3), since the three tools upload at different moments.
#   usage (as root): benches/peers.sh
#   ROWS="1 2 7" benches/peers.sh     only those rows (default: 1 to 12; 2 and 3 share one run,
#                                     so do 10's cold and disk-cache reads)
#   SMALL=1 benches/peers.sh          smaller sizes for a quick check (about 5 minutes)
#   DELAY_MS=50                       the proxy's delay each way (default 20)
#   TOOLS="autosync s3fs"             only those mounts (default: autosync rclone s3fs)
#   WAIT_SECS=900                     how long to wait for the bucket to hold a result
#   AUTOSYNC_BIN=PATH, DELAY_PROXY=PATH   other builds than target/release/{autosync,examples/delay_proxy}
#   KEEP=1                            keep the work dir (/var/tmp/autosync-peers.*) and its logs
# Each tool runs with its defaults plus what it needs to reach the bucket: autosync
# --endpoint --allow-http --region (upload delay 2 s), rclone --vfs-cache-mode full (write-back
# 5 s), s3fs -o use_cache (uploads at close). Every workload gets a fresh mount and an empty
# cache unless it says otherwise, and the page cache is dropped before it.
# Needs rclone, s3fs, sqlite3, git, bc, garage ($AUTOSYNC_GARAGE, else ~/.cargo/bin/garage) and
# boto3 in .ci/venv; fio if installed (else a Python pread loop). Full size: about 25 minutes
# on 2 cores, 6 GiB free in /var/tmp.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
me=benches/peers.sh
source "$root/benches/lib.sh"

DELAY_MS=${DELAY_MS:-20}
ROWS=${ROWS:-1 2 3 4 5 6 7 8 9 10 11 12}
TOOLS=${TOOLS:-autosync rclone s3fs}
WAIT_SECS=${WAIT_SECS:-900}
MiB=$((1 << 20))
if [ "${SMALL:-0}" = 1 ]; then
  n_files=50 append_mb=8 big_mb=32 rss_mb=128 n_creates=100 n_ls=1000 n_rand=500 n_git=300 n_sql=1000 n_tx=10
else
  n_files=200 append_mb=64 big_mb=256 rss_mb=1024 n_creates=1000 n_ls=10000 n_rand=2000 n_git=3000 n_sql=10000 n_tx=100
fi

# ---- checks ------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run it as root (it mounts, and writes /proc/sys/vm/drop_caches)"
[ -e /dev/fuse ] || die "no /dev/fuse: modprobe fuse (in a container: --device /dev/fuse)"
need rclone; need s3fs; need sqlite3; need git; need bc; need findmnt util-linux
find_garage
[[ "$DELAY_MS" =~ ^[0-9]+$ ]] || die "DELAY_MS must be a whole number of milliseconds, not '$DELAY_MS'"
for t in $TOOLS; do
  case $t in autosync | rclone | s3fs) ;; *) die "unknown tool '$t' in TOOLS: use autosync, rclone, s3fs" ;; esac
done
for r in $ROWS; do
  [[ " 1 2 3 4 5 6 7 8 9 10 11 12 " == *" $r "* ]] || die "unknown row '$r' in ROWS: use numbers 1 to 12"
done
python=$root/.ci/venv/bin/python
"$python" -c 'import boto3' 2> /dev/null ||
  die "no boto3 in $root/.ci/venv: python3 -m venv .ci/venv && .ci/venv/bin/pip install boto3"
fio=$(command -v fio || true)   # else random reads by a Python pread loop
bin=${AUTOSYNC_BIN:-$root/target/release/autosync}
if [ ! -x "$bin" ]; then
  [ -z "${AUTOSYNC_BIN:-}" ] || die "AUTOSYNC_BIN=$bin is not an executable: build it or unset AUTOSYNC_BIN"
  echo "$me: no release build, building it: cargo build --release" >&2
  (cd "$root" && cargo build --release --quiet) || die "cargo build --release failed: fix the build, or set AUTOSYNC_BIN"
fi
proxy=${DELAY_PROXY:-$root/target/release/examples/delay_proxy}
if [ -z "${DELAY_PROXY:-}" ] && { [ ! -x "$proxy" ] || [ "$root/examples/delay_proxy.rs" -nt "$proxy" ]; }; then
  echo "$me: building the delay proxy: cargo build --release --example delay_proxy" >&2
  (cd "$root" && cargo build --release --quiet --example delay_proxy) ||
    die "cargo build --release --example delay_proxy failed: fix the build, or set DELAY_PROXY to a built proxy"
fi
[ -x "$proxy" ] || die "DELAY_PROXY=$proxy is not an executable: build it (cargo build --release --example delay_proxy)"

# ---- the work dir, and cleaning up ---------------------------------------------------------
work=$(mktemp -d /var/tmp/autosync-peers.XXXXXX)
mkdir -p "$work/log" "$work/res" "$work/data" "$work/mnt" "$work/local"
: > "$work/pids"
# The build in use is copied, so that a rebuild during the run (cargo test) does not change it.
cp "$bin" "$work/autosync"; bin_src=$bin; bin=$work/autosync
proxy_pid=""
cleanup() {
  set +e
  local m p rest
  # mounts a failed row left behind, deepest first
  for m in $(findmnt -rn -o TARGET | grep "^$work/" | sort -r); do
    umount "$m" 2> /dev/null || umount -l "$m"
  done
  # the mount daemons this script started (pid, mount point), if they still run
  while read -r p rest; do
    grep -qF "$rest" "/proc/$p/cmdline" 2> /dev/null && kill "$p"
  done < "$work/pids"
  [ -n "$proxy_pid" ] && kill "$proxy_pid" 2> /dev/null
  stop_garage
  drop_work
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load_start=$(load_now)

# ---- Garage, the buckets, the proxy --------------------------------------------------------
start_garage "$work/garage"
for b in fixtures ref peer-autosync peer-rclone peer-s3fs; do garage_bucket "$b"; done
bucket_of() { echo "peer-$1"; }
echo "$key_id:$secret" > "$work/s3fs.passwd"; chmod 600 "$work/s3fs.passwd"
export RCLONE_S3_ACCESS_KEY_ID=$key_id RCLONE_S3_SECRET_ACCESS_KEY=$secret RCLONE_S3_REGION=garage
export RCLONE_CONFIG=/dev/null   # the :s3: remotes take everything from flags and these
"$proxy" 127.0.0.1:0 "127.0.0.1:$s3_port" "$DELAY_MS" > "$work/proxy.addr" 2> "$work/log/proxy.log" &
proxy_pid=$!
for _ in $(seq 100); do [ -s "$work/proxy.addr" ] && break; sleep 0.05; done
[ -s "$work/proxy.addr" ] || die "the delay proxy did not start: $(tail -2 "$work/log/proxy.log")"
wan=http://$(head -1 "$work/proxy.addr")

# ---- the Python helper: S3 calls (boto3), waiting for the bucket, random reads -------------
cat > "$work/helper.py" << 'EOF'
import concurrent.futures as cf, hashlib, io, os, random, sys, time
import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

cmd, endpoint, a = sys.argv[1], sys.argv[2], sys.argv[3:]
s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(
    s3={"addressing_style": "path"}, max_pool_connections=64, retries={"max_attempts": 3}))
XFER = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=10)
# the attributes s3fs (and autosync, which shares its layout) read; rclone reads mtime
meta = lambda: {"mode": "33188", "uid": "0", "gid": "0", "mtime": str(int(time.time()))}
t0 = time.time()

def listing(bucket, prefix):
    sizes = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            sizes[o["Key"]] = o["Size"]
    return sizes

def md5_of(bucket, key):
    h = hashlib.md5()
    for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        h.update(chunk)
    return h.hexdigest()

if cmd == "put":        # put FILE BUCKET KEY
    s3.upload_file(a[0], a[1], a[2], ExtraArgs={"Metadata": meta()}, Config=XFER)
elif cmd == "copy":     # copy SRC_BUCKET SRC_KEY DST_BUCKET DST_KEY (server side)
    s3.copy_object(CopySource={"Bucket": a[0], "Key": a[1]}, Bucket=a[2], Key=a[3])
elif cmd == "many":     # many BUCKET PREFIX N SIZE THREADS: PREFIX1..PREFIXN, SIZE random bytes each
    n, size, threads = int(a[2]), int(a[3]), int(a[4])
    def put(i):
        s3.put_object(Bucket=a[0], Key=f"{a[1]}{i}", Body=os.urandom(size), Metadata=meta())
    with cf.ThreadPoolExecutor(threads) as ex:
        list(ex.map(put, range(1, n + 1)))
    print(f"{time.time() - t0:.3f}")
elif cmd == "get":      # get BUCKET KEY: downloads to nowhere (10 x 8 MiB ranges at once); seconds
    with open(os.devnull, "wb") as f:
        s3.download_fileobj(a[0], a[1], f, Config=XFER)
    print(f"{time.time() - t0:.3f}")
elif cmd == "append":   # append BUCKET KEY LINE: what a client does without a mount: GET, PUT back
    buf = io.BytesIO()
    s3.download_fileobj(a[0], a[1], buf, Config=XFER)
    buf.write(a[2].encode() + b"\n"); buf.seek(0)
    s3.upload_fileobj(buf, a[0], a[1], Config=XFER)
    print(f"{time.time() - t0:.3f}")
elif cmd == "sizes":    # sizes BUCKET PREFIX: KEY<TAB>SIZE lines
    for k, v in sorted(listing(a[0], a[1]).items()):
        print(f"{k}\t{v}")
elif cmd == "watch":
    # watch BUCKET PREFIX SPEC TIMEOUT: prints "ready", waits for the file SPEC (lines
    # PATH<TAB>SIZE[<TAB>MD5]), then lists PREFIX until every PREFIX+PATH has its SIZE. Prints the
    # time (epoch seconds) of the first listing that had them all, then checks the MD5s given.
    bucket, prefix, spec, timeout = a[0], a[1], a[2], float(a[3])
    print("ready", flush=True)
    while not os.path.exists(spec):
        time.sleep(0.01)
    want = [l.rstrip("\n").split("\t") for l in open(spec) if l.strip()]
    deadline = time.time() + timeout
    while True:
        t = time.time()
        have = listing(bucket, prefix)
        missing = [w for w in want if have.get(prefix + w[0]) != int(w[1])]
        if not missing:
            break
        if time.time() > deadline:
            w = missing[0]
            sys.exit(f"timeout: after {timeout:.0f} s the bucket lacks {len(missing)} of {len(want)} files, "
                     f"e.g. {prefix}{w[0]} (size {have.get(prefix + w[0])}, want {w[1]})")
        time.sleep(max(0.05, min(0.5, time.time() - t)))
    print(f"{t:.3f}", flush=True)
    for w in want:
        if len(w) > 2 and md5_of(bucket, prefix + w[0]) != w[2]:
            sys.exit(f"wrong bytes in the bucket: {prefix}{w[0]} has the right size but not the written content")
elif cmd == "randread":  # randread FILE N: N preads of 4 KiB at random 4 KiB offsets (seed 1); IOPS
    path, n = a[0], int(a[1])
    fd = os.open(path, os.O_RDONLY)
    blocks = os.fstat(fd).st_size // 4096
    rng = random.Random(1)
    t = time.time()
    for _ in range(n):
        if len(os.pread(fd, 4096, rng.randrange(blocks) * 4096)) != 4096:
            sys.exit("short read")
    print(f"{n / (time.time() - t):.0f}")
else:
    sys.exit(f"unknown command {cmd}")
EOF
py() { "$python" "$work/helper.py" "$@"; }   # py CMD ENDPOINT ARGS...

# The proxy: one request on a new connection costs the handshake's round trip and its own;
# the next request on that connection only its own. Measured with curl (one connection, two
# requests to Garage's S3 port, which answers at once).
read -r t1 t2 < <(curl -s -o /dev/null -o /dev/null -w '%{time_total} ' "$wan/" "$wan/"; echo) ||
  die "curl through the delay proxy failed: see $work/log/proxy.log and $work/garage/log"
rt1=$(echo "$t1 * 1000 / 1" | bc) rt2=$(echo "$t2 * 1000 / 1" | bc)
proxy_note="a request on a new connection ${rt1} ms (expected $((4 * DELAY_MS)) plus Garage's answer), the next one ${rt2} ms (expected $((2 * DELAY_MS)))"
# 10 % early (the proxy aims 1 ms early), or late by Garage's answer on a busy machine
in_range() { [ "$1" -ge $(($2 * 9 / 10)) ] && [ "$1" -le $(($2 * 3 / 2 + 30)) ]; }
in_range "$rt1" $((4 * DELAY_MS)) && in_range "$rt2" $((2 * DELAY_MS)) ||
  die "the delay proxy is off: $proxy_note; check examples/delay_proxy.rs (log: $work/log/proxy.log)"

# ---- mounting and unmounting ---------------------------------------------------------------
alive() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2> /dev/null; }
# mount_tool TOOL NET PREFIX TAG: mounts TOOL's bucket at PREFIX, over loopback (NET=lo) or the
# proxy (NET=wan), at $work/mnt/TOOL, with the cache (and for autosync the state) of TAG: a new
# TAG is an empty cache, the same TAG again finds the disk cache. Runs the daemon in the
# foreground, as a child of the caller; sets mnt and mpid.
mount_tool() {
  local tool=$1 net=$2 prefix=$3 tag=$4 ep log
  if [ "$net" = wan ]; then ep=$wan; else ep=$endpoint; fi
  mnt=$work/mnt/$tool; log=$work/log/$tool.$tag.log; mstate=$work/cache/$tool.$tag/state
  mkdir -p "$mnt" "$work/cache/$tool.$tag"
  case $tool in
    autosync)
      "$bin" mount "s3://$(bucket_of autosync)/$prefix" "$mnt" --endpoint "$ep" --allow-http \
        --region garage --state-dir "$mstate" --cache-dir "$work/cache/$tool.$tag/cache" \
        >> "$log" 2>&1 & ;;
    rclone)
      rclone mount ":s3:$(bucket_of rclone)/$prefix" "$mnt" --s3-provider Other --s3-endpoint "$ep" \
        --s3-force-path-style --s3-region garage --vfs-cache-mode full --cache-dir "$work/cache/$tool.$tag" \
        >> "$log" 2>&1 & ;;
    s3fs)
      s3fs "$(bucket_of s3fs):/$prefix" "$mnt" -f -o "url=$ep,use_path_request_style,endpoint=garage" \
        -o "passwd_file=$work/s3fs.passwd,use_cache=$work/cache/$tool.$tag,dbglevel=warn" >> "$log" 2>&1 & ;;
  esac
  mpid=$!
  echo "$mpid $mnt" >> "$work/pids"
  for _ in $(seq 600); do
    findmnt -rn "$mnt" > /dev/null && return 0
    alive "$mpid" || die "$tool did not mount ($net): $(tail -2 "$log" | tr '\n' ' ')"
    sleep 0.05
  done
  die "$tool did not mount within 30 s ($net): see $log"
}
# unmount_tool TOOL: unmounts $mnt and waits for the daemon to exit (autosync: after it uploaded
# what is pending, within its --shutdown-grace)
unmount_tool() {
  if [ "$1" = autosync ]; then
    timeout 90 "$bin" unmount "$mnt" --state-dir "$mstate" > /dev/null 2>&1 ||
      die "autosync unmount $mnt failed: see $work/log/autosync.*.log"
  else
    umount "$mnt" 2> /dev/null || fusermount -u "$mnt" || die "cannot unmount $1 at $mnt: something uses it"
  fi
  for _ in $(seq 1200); do alive "$mpid" || { wait "$mpid" 2> /dev/null || true; return 0; }; sleep 0.05; done
  kill "$mpid"; die "$1 ($mpid) still ran 60 s after its unmount"
}

# watch_start TOOL PREFIX: starts a watcher on TOOL's bucket under PREFIX/ (loopback), waits
# until it is ready. watch_end SPECFILE: hands it what must be there; sets $held to the time
# (epoch s) at which the bucket first held it all. (Not in a $(...): the watcher is a child of
# this shell.) The spec file: lines PATH<TAB>SIZE[<TAB>MD5].
watch_start() {
  watch_out=$work/watch.$BASHPID; rm -f "$watch_out" "$watch_out.spec"
  py watch "$endpoint" "$(bucket_of "$1")" "$2/" "$watch_out.spec" "$WAIT_SECS" > "$watch_out" 2> "$watch_out.err" &
  watch_pid=$!
  for _ in $(seq 600); do grep -q ready "$watch_out" 2> /dev/null && return 0; sleep 0.02; done
  die "the bucket watcher (boto3) did not start"
}
watch_end() {
  mv "$1" "$watch_out.spec"
  wait "$watch_pid" || die "$(tail -1 "$watch_out.err" | grep . || echo "the bucket watcher failed")"
  held=$(sed -n 2p "$watch_out")
}
isnum() { [[ "$1" =~ ^[0-9]*\.?[0-9]+$ ]]; }
# out ID VALUE [LABEL]: one result line; a missing figure (a failed step) fails the row
out() { isnum "$2" || die "no figure for row $1 (got '$2')"; echo "$@"; }
since() { echo "scale=3; ($1 - $2) / 1" | bc | sed 's/^\./0./'; }   # since END START: seconds
put() { py put "$endpoint" "$1" fixtures "$2" > /dev/null; }          # put FILE KEY: a fixture
# fixture TOOL KEY DEST: the fixture KEY copied into TOOL's bucket as DEST (server side)
fixture() { py copy "$endpoint" fixtures "$1" "$(bucket_of "$2")" "$3" > /dev/null; }
# files_spec DIR: PATH<TAB>SIZE of every file under DIR (what must reach the bucket)
files_spec() { find "$1" -type f -printf '%P\t%s\n'; }
hwm() { awk '/VmHWM/{print int($2 / 1024)}' "/proc/$1/status"; }   # peak RSS, MiB

# ---- the fixtures (random bytes, so that nothing compresses or dedups across rows) ----------
need_fixture() {   # need_fixture NAME MiB: a local file data/NAME and the object NAME in fixtures
  [ -e "$work/data/$1" ] && return 0
  head -c $(($2 * MiB)) /dev/urandom > "$work/data/$1"
  put "$work/data/$1" "$1"
}

# ---- the rows: row_N TOOL runs workload N on TOOL and prints "ID VALUE" lines; ref_N prints
# "ID VALUE LABEL" for the reference. Each runs in a subshell of its own (see run).

row_1() {   # WAN: n_files new 4 KiB files, until all are in the bucket
  mkdir -p "$work/data/r1.$1"
  for i in $(seq "$n_files"); do head -c 4096 /dev/urandom > "$work/data/r1.$1/f$i"; done
  mount_tool "$1" wan r1 r1
  drop_caches; watch_start "$1" r1
  local s e; s=$(now)
  cp "$work/data/r1.$1"/f* "$mnt/"
  files_spec "$work/data/r1.$1" > "$work/spec.$1"
  watch_end "$work/spec.$1"; e=$held
  out 1 "$(since "$e" "$s")"
  unmount_tool "$1"
}
ref_1() {
  local t; t=$(py many "$wan" ref r1/f "$n_files" 4096 16)
  out 1 "$t" boto3,_16_PUTs_at_once
}

row_2() {   # WAN: append a line to a file already in the bucket: until >> returns, until in the bucket
  need_fixture append "$append_mb"
  fixture append "$1" r2/file
  mount_tool "$1" wan r2 r2
  drop_caches; watch_start "$1" r2
  local s e b line="appended by $1"
  s=$(now)
  echo "$line" >> "$mnt/file"
  e=$(now)
  { cat "$work/data/append"; echo "$line"; } > "$work/data/r2.$1"
  printf 'file\t%s\t%s\n' "$(stat -c %s "$work/data/r2.$1")" "$(md5sum < "$work/data/r2.$1" | cut -d' ' -f1)" > "$work/spec.$1"
  out 2 "$(since "$e" "$s")"
  watch_end "$work/spec.$1"; b=$held
  out 3 "$(since "$b" "$s")"
  rm -f "$work/data/r2.$1"
  unmount_tool "$1"
}
ref_2() {
  need_fixture append "$append_mb"
  cp "$work/data/append" "$work/local/append"; drop_caches
  local s e t; s=$(now); echo "appended locally" >> "$work/local/append"; e=$(now)
  out 2 "$(since "$e" "$s")" local_disk
  py copy "$endpoint" fixtures append ref r2/file > /dev/null
  t=$(py append "$wan" ref r2/file "appended by boto3")
  out 3 "$t" boto3_GET+PUT
  rm -f "$work/local/append"
}

row_4() {   # WAN: write big_mb MiB (new file), until the bucket holds it
  head -c $((big_mb * MiB)) /dev/urandom > "$work/data/r4.$1"
  mount_tool "$1" wan r4 r4
  drop_caches; cat "$work/data/r4.$1" > /dev/null   # the source in the page cache
  watch_start "$1" r4
  local s e; s=$(now)
  cp "$work/data/r4.$1" "$mnt/big"
  printf 'big\t%s\t%s\n' $((big_mb * MiB)) "$(md5sum < "$work/data/r4.$1" | cut -d' ' -f1)" > "$work/spec.$1"
  watch_end "$work/spec.$1"; e=$held
  out 4 "$(since "$e" "$s")"
  rm -f "$work/data/r4.$1"
  unmount_tool "$1"
}
ref_4() {
  head -c $((big_mb * MiB)) /dev/urandom > "$work/data/r4.ref"
  local s e; s=$(now)
  py put "$wan" "$work/data/r4.ref" ref r4/big; e=$(now)
  out 4 "$(since "$e" "$s")" boto3_PUT,_10x8MiB_parts
  rm -f "$work/data/r4.ref"
}

# cat_mbps FILE BYTES: reads FILE, prints MB/s
cat_mbps() { local s e; s=$(now); cat "$1" > /dev/null; e=$(now); mbps "$2" "$e - $s"; }

row_5() {   # WAN: cold read of big_mb MiB
  need_fixture big "$big_mb"
  fixture big "$1" r5/big
  mount_tool "$1" wan r5 r5
  stat "$mnt/big" > /dev/null; drop_caches
  local m; m=$(cat_mbps "$mnt/big" $((big_mb * MiB)))
  out 5 "$m"
  unmount_tool "$1"
}
ref_5() {
  need_fixture big "$big_mb"
  local b r s e t
  drop_caches
  t=$(py get "$wan" fixtures big); b=$(mbps $((big_mb * MiB)) "$t")
  drop_caches; s=$(now)
  rclone cat ":s3:fixtures/big" --s3-provider Other --s3-endpoint "$wan" --s3-force-path-style > /dev/null
  e=$(now); r=$(mbps $((big_mb * MiB)) "$e - $s")
  if [ "$(echo "$b >= $r" | bc)" = 1 ]; then out 5 "$b" boto3_10x8MiB_ranges; else out 5 "$r" rclone_cat; fi
}

row_6() {   # loopback: read after a remount (disk cache)
  need_fixture big "$big_mb"
  fixture big "$1" r6/big
  mount_tool "$1" lo r6 r6
  cat "$mnt/big" > /dev/null   # fills the disk cache
  unmount_tool "$1"
  drop_caches
  mount_tool "$1" lo r6 r6
  stat "$mnt/big" > /dev/null
  local m; m=$(cat_mbps "$mnt/big" $((big_mb * MiB)))
  out 6 "$m"
  unmount_tool "$1"
}
ref_6() {
  need_fixture big "$big_mb"
  local b=0 m
  cat "$work/data/big" > /dev/null
  for _ in 1 2 3; do
    m=$(cat_mbps "$work/data/big" $((big_mb * MiB)))
    [ "$(echo "$m > $b" | bc)" = 1 ] && b=$m
  done
  out 6 "$b" local_page_cache
}

creates() { local i; for i in $(seq "$n_creates"); do echo x > "$1/f$i"; done; }
row_7() {   # loopback: small creates in one shell loop
  mount_tool "$1" lo r7 r7
  drop_caches
  local s e; s=$(now); creates "$mnt"; e=$(now)
  out 7 "$(since "$e" "$s")"
  unmount_tool "$1"
}
ref_7() {
  mkdir -p "$work/local/r7"; drop_caches
  local s e; s=$(now); creates "$work/local/r7"; e=$(now)
  out 7 "$(since "$e" "$s")" local_disk
}

row_8() {   # loopback: the daemon's peak RSS reading rss_mb MiB
  need_fixture rss "$rss_mb"
  fixture rss "$1" r8/file
  mount_tool "$1" lo r8 r8
  drop_caches
  cat "$mnt/file" > /dev/null
  local h; h=$(hwm "$mpid")
  out 8 "$h"
  unmount_tool "$1"
}
ref_8() { out 8 300 "limit_(issue_4)"; }

ls_fixture() {   # ls_fixture TOOL: n_ls empty-ish objects under r9/d/ in TOOL's bucket
  py many "$endpoint" "$(bucket_of "$1")" r9/d/f "$n_ls" 100 32 > /dev/null
}
row_9() {   # loopback: ls -l of n_ls entries, cold
  ls_fixture "$1"
  mount_tool "$1" lo r9 r9
  drop_caches
  local s e n; s=$(now)
  n=$(ls -l "$mnt/d" | grep -c '^-') || true
  e=$(now)
  out 9 "$(since "$e" "$s")"
  [ "$n" = "$n_ls" ] || die "ls -l listed $n files, not $n_ls"
  unmount_tool "$1"
}
ref_9() {
  mkdir -p "$work/local/r9"
  (cd "$work/local/r9" && seq -f 'f%.0f' "$n_ls" | xargs touch)
  drop_caches
  local s e; s=$(now); ls -l "$work/local/r9" > /dev/null; e=$(now)
  out 9 "$(since "$e" "$s")" local_disk,_cold
}

# randread FILE: n_rand reads of 4 KiB at random offsets, the same ones each time; prints IOPS
randread() {
  if [ -n "$fio" ]; then
    "$fio" --name=rand --filename="$1" --ioengine=psync --direct=0 --invalidate=0 --numjobs=1 \
      --rw=randread --bs=4k --size=$((big_mb * MiB)) --readonly --number_ios="$n_rand" --randrepeat=1 \
      --output-format=terse --terse-version=3 | cut -d';' -f8
  else
    py randread "$endpoint" "$1" "$n_rand"
  fi
}
row_10() {   # loopback: random 4 KiB reads, cold and from the disk cache after a remount
  need_fixture big "$big_mb"
  fixture big "$1" r10/big
  mount_tool "$1" lo r10 r10
  stat "$mnt/big" > /dev/null; drop_caches
  local i; i=$(randread "$mnt/big")
  out 10c "$i"
  unmount_tool "$1"
  drop_caches
  mount_tool "$1" lo r10 r10
  stat "$mnt/big" > /dev/null
  i=$(randread "$mnt/big")
  out 10d "$i"
  unmount_tool "$1"
}
ref_10() {
  need_fixture big "$big_mb"
  drop_caches
  local c; c=$(randread "$work/data/big")
  out 10c "$c" local_disk,_cold
  out 10d "$c" local_disk,_cold
}

git_fixture() {   # a repository of n_git files in 30 folders, one commit, packed
  [ -d "$work/data/git" ] && return 0
  local d=$work/data/git i
  mkdir -p "$d"
  for i in $(seq "$n_git"); do
    mkdir -p "$d/dir$((i % 30))"
    { echo "file $i"; head -c $((200 + i % 3000)) /dev/urandom | base64; } > "$d/dir$((i % 30))/f$i.txt"
  done
  git -C "$d" init -q && git -C "$d" add -A &&
    git -C "$d" -c user.name=bench -c user.email=bench@localhost commit -qm "fixture" && git -C "$d" gc -q ||
    die "cannot make the git fixture in $d"
}
row_11() {   # loopback: git clone of a repository into the mount, until the bucket holds it
  git_fixture
  mount_tool "$1" lo r11 r11
  drop_caches; watch_start "$1" r11
  local s e; s=$(now)
  git clone -q "file://$work/data/git" "$mnt/repo"
  files_spec "$mnt" > "$work/spec.$1"
  watch_end "$work/spec.$1"; e=$held
  out 11 "$(since "$e" "$s")"
  unmount_tool "$1"
}
ref_11() {
  git_fixture
  drop_caches
  local s e; s=$(now)
  git clone -q "file://$work/data/git" "$work/local/repo"; sync -f "$work/local/repo"; e=$(now)
  out 11 "$(since "$e" "$s")" local_disk_+_sync
}

sql_script() {   # n_sql inserts in n_tx transactions
  local per=$((n_sql / n_tx)) t
  echo "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
  for t in $(seq 0 $((n_tx - 1))); do
    echo "BEGIN;"
    seq $((t * per + 1)) $(((t + 1) * per)) | sed "s/.*/INSERT INTO t (v) VALUES ('row &, some text to fill the page');/"
    echo "COMMIT;"
  done
}
row_12() {   # loopback: sqlite
  [ -e "$work/data/sql" ] || sql_script > "$work/data/sql"
  mount_tool "$1" lo r12 r12
  drop_caches
  local s e n; s=$(now)
  sqlite3 "$mnt/db" < "$work/data/sql"; e=$(now)
  out 12 "$(since "$e" "$s")"
  n=$(sqlite3 "$mnt/db" 'SELECT count(*) FROM t')
  [ "$n" = "$n_sql" ] || die "sqlite counts $n rows, not $n_sql"
  unmount_tool "$1"
}
ref_12() {
  [ -e "$work/data/sql" ] || sql_script > "$work/data/sql"
  drop_caches
  local s e; s=$(now)
  sqlite3 "$work/local/db" < "$work/data/sql"; e=$(now)
  out 12 "$(since "$e" "$s")" local_disk
}

# run ROW WHO FUNC: FUNC WHO in a subshell with errexit of its own (a failure ends that cell, not
# the run); its "ID VALUE [LABEL]" lines go to res/ROW.WHO, the error to log/ROW.WHO.err. A mount
# it left behind is unmounted.
run() {
  local row=$1 who=$2 fn=$3
  (
    set -euo pipefail
    tool=$who mnt=$work/mnt/$who mpid="" watch_pid=""
    trap 'if findmnt -rn "$mnt" > /dev/null; then umount "$mnt" 2> /dev/null || umount -l "$mnt"; fi
          [ -n "$mpid" ] && alive "$mpid" && kill "$mpid" 2> /dev/null
          [ -n "$watch_pid" ] && alive "$watch_pid" && kill "$watch_pid" 2> /dev/null; true' EXIT
    "$fn" "$who"
  ) > "$work/res/$row.$who" 2> "$work/log/$row.$who.err" &
  if wait $!; then return 0; fi
  echo "FAIL" > "$work/res/$row.$who.failed"
  notes+=("row $row, $who: $(grep -v '^\s*$' "$work/log/$row.$who.err" | tail -1)")
}

# ---- run the selected rows ---------------------------------------------------------------------
declare -A val label
notes=()
done_fn=" "
echo "autosync peers benchmark: rows $ROWS; tools $TOOLS; DELAY_MS=$DELAY_MS$([ "${SMALL:-0}" = 1 ] && echo ", SMALL=1")" >&2
for r in $ROWS; do
  fn=$r; [ "$r" = 3 ] && fn=2   # rows 2 and 3 come from one run
  [[ "$done_fn" == *" $fn "* ]] && continue
  done_fn+="$fn "
  echo "  row $fn: reference..." >&2
  run "$fn" ref "ref_$fn"
  for t in $TOOLS; do echo "  row $fn: $t..." >&2; run "$fn" "$t" "row_$fn"; done
  for who in ref $TOOLS; do
    while read -r id v l; do
      val[$id.$who]=$v; [ -n "${l:-}" ] && label[$id]=${l//_/ }
    done < "$work/res/$fn.$who"
    if [ -e "$work/res/$fn.$who.failed" ]; then
      case $fn in 2) fids="2 3" ;; 10) fids="10c 10d" ;; *) fids=$fn ;; esac
      for id in $fids; do [ -n "${val[$id.$who]:-}" ] || val[$id.$who]=fail; done
    fi
  done
done
load_end=$(load_now)

# ---- the table ---------------------------------------------------------------------------------
declare -A title unit
title[1]="WAN: $n_files new 4 KiB files, until all in the bucket"
title[2]="WAN: append a line to a $append_mb MiB file, until >> returns"
title[3]="WAN: the same append, until the bucket holds it"
title[4]="WAN: write $big_mb MiB, until the bucket holds it"
title[5]="WAN: cold read of $big_mb MiB"
title[6]="loopback: read $big_mb MiB after a remount (disk cache)"
title[7]="loopback: $n_creates small creates in one shell loop"
title[8]="loopback: daemon peak RSS reading $rss_mb MiB"
title[9]="loopback: ls -l of $n_ls entries, cold mount"
title[10c]="loopback: random 4 KiB reads x $n_rand in $big_mb MiB, cold"
title[10d]="loopback: the same reads after a remount (disk cache)"
title[11]="loopback: git clone, $n_git files, until the bucket holds it"
title[12]="loopback: sqlite, $n_sql inserts in $n_tx transactions"
for id in 1 2 3 4 7 9 11 12; do unit[$id]=s; done
unit[5]=MB/s unit[6]=MB/s unit[8]=MiB unit[10c]=IOPS unit[10d]=IOPS
higher_better() { [ "${unit[$1]}" = MB/s ] || [ "${unit[$1]}" = IOPS ]; }
# vs_best ID: autosync's figure against the best peer's, > 1 when autosync is better
vs_best() {
  local id=$1 a=${val[$1.autosync]:-} best="" p v
  isnum "$a" || { echo "-"; return; }
  for p in rclone s3fs; do
    v=${val[$id.$p]:-}; isnum "$v" || continue
    if [ -z "$best" ]; then best=$v
    elif higher_better "$id"; then [ "$(echo "$v > $best" | bc)" = 1 ] && best=$v
    else [ "$(echo "$v < $best" | bc)" = 1 ] && best=$v; fi
  done
  [ -n "$best" ] || { echo "-"; return; }
  if [ "$(echo "$a == 0 || $best == 0" | bc)" = 1 ]; then echo "-"; return; fi
  if higher_better "$id"; then ratio "$a" "$best"; else ratio "$best" "$a"; fi
}
cell() { local v=${val[$1.$2]:-}; [ -n "$v" ] || v=" "; [[ " $TOOLS ref " == *" $2 "* ]] || v="-"; echo "$v"; }

echo
echo "autosync vs rclone mount and s3fs on one Garage (loopback; WAN = through delay_proxy, $DELAY_MS ms each way)"
printf '| %-68s | %9s | %9s | %9s | %-30s | %s |\n' "workload (unit)" autosync rclone s3fs "reference/limit" "autosync/best peer"
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- "-%.0s" {1..70})" "-----------" "-----------" "-----------" "--------------------------------" "--------------------"
ids=()
for r in $ROWS; do case $r in 10) ids+=(10c 10d) ;; *) ids+=("$r") ;; esac; done
for id in "${ids[@]}"; do
  ref=$(cell "$id" ref)
  [ "$ref" = " " ] || [ "$ref" = fail ] || ref="$ref ${label[$id]:-}"
  printf '| %-68s | %9s | %9s | %9s | %-30s | %s |\n' "${id%[cd]}. ${title[$id]} (${unit[$id]})" \
    "$(cell "$id" autosync)" "$(cell "$id" rclone)" "$(cell "$id" s3fs)" "$ref" "$(vs_best "$id")"
done
echo
echo "ratio: best peer / autosync for s and MiB, autosync / best peer for MB/s and IOPS (> 1: autosync is better)"
echo "machine: $(machine)"
echo "builds: autosync $bin_src ($(date -r "$bin_src" "+%F %T"), HEAD $(git -C "$root" log -1 --format=%h 2> /dev/null)); rclone $(rclone version | head -1 | awk '{print $2}'); s3fs $(s3fs --version 2>&1 | grep -o 'V[0-9.]*' | head -1); garage $("$garage" --version | awk '{print $2}'); fio $([ -n "$fio" ] && "$fio" --version || echo "none (python pread)")"
echo "proxy: $proxy_note"
echo "load average at start: $load_start"
echo "load average at end:   $load_end"
if [ ${#notes[@]} -gt 0 ]; then
  echo "failures (logs in $work/log; KEEP=1 keeps them):"
  printf '  %s\n' "${notes[@]}"
fi

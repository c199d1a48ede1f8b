# Helpers shared by the benchmark scripts (benches/fio.sh, benches/peers.sh): a single-node
# Garage on loopback, free ports, dropping the page cache, timing and ratio arithmetic, the
# machine's description. Not a script of its own:
#   me=benches/NAME.sh; source "$root/benches/lib.sh"   (after set -euo pipefail)
# The caller sets $me (the prefix of error lines) and calls stop_garage from its EXIT trap.

die() { echo "${me:-benches}: $*" >&2; exit 1; }
# need CMD PACKAGE: fails with the install command when CMD is missing
need() { command -v "$1" > /dev/null || die "$1 not found: apt-get install -y ${2:-$1}"; }

free_port() {   # a TCP port nothing listens on, in 20000..59999
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
mbps() { echo "scale=1; $1 / ($2) / 1000000" | bc -l; }       # bytes, seconds -> MB/s
ratio() { echo "scale=2; $1 / $2" | bc -l | sed 's/^\./0./; s/^-\./-0./'; }
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }   # CPU s
# builds: a note when compilers run next to the benchmark (the figures are then noisy)
builds() { local n; n=$(pgrep -c rustc || true); [ "$n" -gt 0 ] && echo "  (note: $n rustc running)" || true; }
# load_now: the load averages, and a note if builds are running
load_now() { echo "$(cut -d' ' -f1-3 /proc/loadavg)$(builds)"; }
# drop_work: removes the work dir $work, or keeps it (KEEP=1) and says where
drop_work() { if [ "${KEEP:-0}" = 1 ]; then echo "$me: kept $work" >&2; else rm -rf "$work"; fi; }
machine() {   # one line: cores, CPU, RAM, kernel
  echo "$(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)," \
    "$(free -g | awk '/Mem/{print $2}') GiB RAM, kernel $(uname -r)"
}

# find_garage: sets $garage ($AUTOSYNC_GARAGE, else ~/.cargo/bin/garage, else PATH)
find_garage() {
  garage=${AUTOSYNC_GARAGE:-$HOME/.cargo/bin/garage}
  [ -x "$garage" ] || garage=$(command -v garage) ||
    die "garage not found: cargo install garage --locked --version 2.5.0 (or set AUTOSYNC_GARAGE)"
}

# start_garage DIR: a single-node Garage on loopback as tests/common/servers.rs starts it, its
# files in DIR, with one key allowed on the buckets garage_bucket makes. Sets garage_dir,
# garage_pid, s3_port, endpoint (http://127.0.0.1:PORT), key_id and secret, and exports the
# AWS_* variables S3 clients (autosync, boto3) read. Region: garage.
garage_pid=""
start_garage() {
  garage_dir=$1
  [ -n "${garage:-}" ] || find_garage
  local rpc_port node key
  s3_port=$(free_port); rpc_port=$(free_port)
  while [ "$rpc_port" = "$s3_port" ]; do rpc_port=$(free_port); done
  mkdir -p "$garage_dir"
  cat > "$garage_dir/garage.toml" << EOF
metadata_dir = "$garage_dir/meta"
data_dir = "$garage_dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
EOF
  RUST_LOG=garage=warn NO_COLOR=1 "$garage" -c "$garage_dir/garage.toml" server > "$garage_dir/log" 2>&1 &
  garage_pid=$!
  for _ in $(seq 300); do
    g status > /dev/null 2>&1 && break
    kill -0 "$garage_pid" 2> /dev/null || die "garage exited at start: $(tail -3 "$garage_dir/log")"
    sleep 0.1
  done
  g status > /dev/null 2>&1 || die "garage did not answer its CLI within 30 s: see $garage_dir/log"
  node=$(g node id -q | cut -d@ -f1)
  g layout assign -z dc1 -c 10G "$node" > /dev/null
  g layout apply --version 1 > /dev/null
  key=$(g key create autosync-bench)
  key_id=$(awk -F: '$1 ~ /Key ID/ {gsub(/ /, "", $2); print $2}' <<< "$key")
  secret=$(awk -F: '$1 ~ /Secret key/ {gsub(/ /, "", $2); print $2}' <<< "$key")
  [ -n "$key_id" ] && [ -n "$secret" ] || die "cannot read the key from \`garage key create\`: $key"
  endpoint="http://127.0.0.1:$s3_port"
  unset AWS_CA_BUNDLE AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT AWS_ENDPOINT_URL_S3
  export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=garage AWS_DEFAULT_REGION=garage
  export AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
}
g() { RUST_LOG=warn "$garage" -c "$garage_dir/garage.toml" "$@"; }   # the Garage CLI
garage_bucket() {   # garage_bucket NAME: creates the bucket NAME, read-write for the key
  g bucket create "$1" > /dev/null || die "garage could not create bucket $1: see $garage_dir/log"
  g bucket allow --read --write --owner "$1" --key autosync-bench > /dev/null
}
stop_garage() {
  [ -n "$garage_pid" ] || return 0
  kill "$garage_pid" 2> /dev/null && wait "$garage_pid" 2> /dev/null || true
  garage_pid=""
}
# rclone_remote NAME ENDPOINT: defines the rclone remote NAME: (S3 at ENDPOINT, path style, the
# Garage key) in the environment, so no rclone.conf is needed
rclone_remote() {
  local n=${1^^}
  export "RCLONE_CONFIG_${n}_TYPE=s3" "RCLONE_CONFIG_${n}_PROVIDER=Other" \
    "RCLONE_CONFIG_${n}_ENDPOINT=$2" "RCLONE_CONFIG_${n}_ACCESS_KEY_ID=$key_id" \
    "RCLONE_CONFIG_${n}_SECRET_ACCESS_KEY=$secret" "RCLONE_CONFIG_${n}_REGION=garage" \
    "RCLONE_CONFIG_${n}_FORCE_PATH_STYLE=true"
}

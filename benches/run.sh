#!/usr/bin/env bash
# hoard's benchmarks. Each figure is measured next to a reference in the same
# run (nginx serving the same files; one pass of SHA-256 + zstd-1 over the
# same bytes), alternating the two, because whole-machine figures on a
# shared 2-core host are noisy and only the ratios mean something.
#
#   bash benches/run.sh            # all
#   bash benches/run.sh get put    # some: get put load concurrent grpc mixed s3 accounting
#   HOARD_BASE=/path/to/older/hoard bash benches/run.sh ledger
#                                  # PUT latency, accounting on, older binary vs this one
set -euo pipefail
cd "$(dirname "$0")/.."
which=("$@")
[ ${#which[@]} -gt 0 ] || which=(get put load concurrent grpc s3 accounting)

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -p hoard -p hoard-bench 2>&1 | tail -1
HOARD=$PWD/target/release/hoard
BENCH=$PWD/target/release/hoard-bench
W=$(mktemp -d /var/tmp/hoard-bench.XXXXXX)
pids=()
# Servers started inside $(...) record their pid only in $W/<name>.pid.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$W"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true; rm -rf "$W"
}
trap cleanup EXIT

# start_hoard NAME PORT ARGS... : starts hoard, waits until /readyz is 200,
# prints the seconds that took.
start_hoard() {
  local name=$1 port=$2; shift 2
  local t0; t0=$(date +%s.%N); echo "$t0" >"$W/$name.t0"
  "$HOARD" --http_address=127.0.0.1:$port --access_log_level=none "$@" >"$W/$name.out" 2>"$W/$name.err" &
  pids+=($!); echo $! >"$W/$name.pid"
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
    kill -0 "$(cat "$W/$name.pid")" 2>/dev/null || { echo "hoard ($name) exited: $(tail -1 "$W/$name.err")" >&2; exit 1; }
    sleep 0.02
  done
  awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN {printf "%.2f\n", a - b}'
}
# sizes_known NAME PORT : seconds from the start of hoard NAME until its
# /status says every stored size is known (IndexSizesKnown).
sizes_known() {
  until curl -sf "http://127.0.0.1:$2/status" | grep -q '"IndexSizesKnown": true'; do sleep 0.02; done
  awk -v a="$(date +%s.%N)" -v b="$(cat "$W/$1.t0")" 'BEGIN {printf "%.2f\n", a - b}'
}
# start_moto PORT : moto (an S3 server) on 127.0.0.1:PORT with bucket "bench".
start_moto() {
  local moto="${MOTO_SERVER:-$PWD/target/e2e-venv/bin/moto_server}"
  "$moto" -H 127.0.0.1 -p "$1" >"$W/moto-$1.log" 2>&1 & echo $! >"$W/moto-$1.pid"; pids+=($!)
  until curl -s -o /dev/null "http://127.0.0.1:$1/"; do sleep 0.05; done
  curl -s -o /dev/null -X PUT "http://127.0.0.1:$1/bench"
}

# start_clickhouse DIR PORT : ClickHouse on 127.0.0.1:PORT (TCP on PORT+1),
# data in DIR, waited for, with hoard's table created.
start_clickhouse() {
  local dir=$1 port=$2
  mkdir -p "$dir/data/tmp"
  cat >"$dir/config.xml" <<CH
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>$dir/server.log</log><errorlog>$dir/error.log</errorlog><console>0</console></logger>
  <http_port>$port</http_port><tcp_port>$((port + 1))</tcp_port><listen_host>127.0.0.1</listen_host>
  <path>$dir/data/</path><tmp_path>$dir/data/tmp/</tmp_path><user_files_path>$dir/data/user_files/</user_files_path>
  <mark_cache_size>536870912</mark_cache_size>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <profiles><default></default></profiles><quotas><default></default></quotas>
</yandex>
CH
  /usr/sbin/clickhouse-server --config-file="$dir/config.xml" >/dev/null 2>&1 & pids+=($!)
  until curl -sf "http://127.0.0.1:$port/ping" >/dev/null; do sleep 0.05; done
  curl -sf --data-binary @deploy/clickhouse/schema.sql "http://127.0.0.1:$port/" >/dev/null
}
# cycle_lua PATHS : a wrk script GETting the paths listed in PATHS in turn.
cycle_lua() {
  cat <<LUA
local paths = {}
for line in io.lines("$1") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = (i % #paths) + 1
  return wrk.format("GET", paths[i])
end
LUA
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$(cat "$W/$1.pid")/status"; }
# Anonymous memory only: RSS without the pages of the binary itself, which
# a process that ran more of its code has more of.
anon_kib() { awk '/^RssAnon/ {print $2}' "/proc/$(cat "$W/$1.pid")/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$(cat "$W/$1.pid")/status"; }
stop() { kill "$(cat "$W/$1.pid")"; while kill -0 "$(cat "$W/$1.pid")" 2>/dev/null; do sleep 0.05; done; }

for what in "${which[@]}"; do case $what in
get)
  # SIZE:COUNT pairs; the 64 KiB set (32 MiB) fits the default hot set, the
  # 1 MiB blobs are above what it keeps.
  sizes=${GET_SIZES:-4096:2000 65536:500 1048576:200}
  mkdir -p "$W/www" "$W/nginx"
  cat >"$W/nginx/nginx.conf" <<NGINX
worker_processes 2;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  # nginx's default (1,000) closes each connection after 1,000 requests and
  # halves its own rate under wrk: a reference must be at its best.
  keepalive_requests 100000;
  client_body_temp_path $W/nginx/body;
  proxy_temp_path $W/nginx/proxy;
  fastcgi_temp_path $W/nginx/fastcgi;
  uwsgi_temp_path $W/nginx/uwsgi;
  scgi_temp_path $W/nginx/scgi;
  server { listen 127.0.0.1:18091; root $W/www; }
}
NGINX
  # nginx workers run unprivileged: let them read the blobs.
  chmod 755 "$W"
  nginx -c "$W/nginx/nginx.conf" -g 'daemon off;' & pids+=($!)
  start_hoard get 18090 --dir="$W/get-cache" >/dev/null
  # The same without the hot set: every hit opens, reads and decodes its file.
  start_hoard getcold 18089 --dir="$W/get-cache-nohot" --hot_set_size=0 --grpc_address=none >/dev/null
  for spec in $sizes; do
    size=${spec%%:*}; count=${spec#*:}
    echo "== ${size}-byte GET hits: hoard vs nginx (wrk -t2 -c32, $count distinct blobs, 10 s per round)"
    "$BENCH" gen-blobs "$W/www/s$size" "$count" "$size"
    chmod -R a+rX "$W/www"
    for who in hoard nginx; do
      prefix=""; [ "$who" = nginx ] && prefix="/s$size"
      ls "$W/www/s$size/cas" | sed "s|^|$prefix/cas/|" >"$W/paths-$who-$size"
      cycle_lua "$W/paths-$who-$size" >"$W/cycle-$who-$size.lua"
    done
    "$BENCH" upload 127.0.0.1:18090 "$W/www/s$size"
    "$BENCH" upload 127.0.0.1:18089 "$W/www/s$size"
    sleep 1
    for round in 1 2 3; do
      for target in hoard:18090 hoard-nohot:18089 nginx:18091; do
        who=hoard; [ "${target%%:*}" = nginx ] && who=nginx
        out=$(wrk -t2 -c32 -d10s --latency -s "$W/cycle-$who-$size.lua" "http://127.0.0.1:${target#*:}")
        rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
        p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
        non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
        echo "size=$size round=$round target=${target%%:*} req_per_s=$rps p99=$p99 non2xx=${non2xx:-0}"
        if [ -n "$non2xx" ]; then echo "error: ${target%%:*} answered non-2xx; the comparison is void" >&2; exit 1; fi
      done
    done
  done
  stop get; stop getcold
  ;;
put)
  echo "== 64 MiB PUT: hoard (zstd storage) vs one pass of SHA-256 + zstd-1 over the same bytes in memory"
  # On tmpfs the comparison is CPU path against CPU path; on the VM's disk
  # it includes the disk (and its throttling), with fsync on as by default.
  shm=$(mktemp -d /dev/shm/hoard-bench.XXXXXX)
  start_hoard putshm 18092 --dir="$shm/cache" --max_size=8 --grpc_address=none >/dev/null
  start_hoard putdisk 18093 --dir="$W/put-cache" --max_size=50 --grpc_address=none >/dev/null
  for round in 1 2 3; do
    echo "round=$round storage=tmpfs $("$BENCH" put 127.0.0.1:18092 64 4 $((round * 100)))"
    echo "round=$round $("$BENCH" reference 64 4 $((round * 100)) 2>/dev/null)"
  done
  for round in 1 2; do
    echo "round=$round storage=disk fsync=true $("$BENCH" put 127.0.0.1:18093 64 4 $((round * 1000)))"
  done
  stop putshm; stop putdisk; rm -rf "$shm"
  ;;
load)
  echo "== startup with 1,000,000 entries: time to /readyz and RSS per entry"
  "$BENCH" mkcache "$W/big" 1000000
  start_hoard empty 18094 --dir="$W/empty" >/dev/null
  sleep 1; base=$(rss_kib empty); abase=$(anon_kib empty); stop empty
  # No snapshot yet: what a start after a crash does, page cache dropped.
  sync; echo 3 >/proc/sys/vm/drop_caches
  secs=$(start_hoard big 18095 --dir="$W/big")
  sleep 1; big=$(rss_kib big); abig=$(anon_kib big)
  status=$(curl -s http://127.0.0.1:18095/status)
  files=$(echo "$status" | awk -F': ' '/"NumFiles"/ {gsub(",","",$2); print $2; exit}')
  heap=$(echo "$status" | awk -F': ' '/"IndexHeapBytes"/ {gsub(",","",$2); print $2}')
  echo "entries=$files scan_cold_ready_seconds=$secs scan_cold_sizes_known_seconds=$(sizes_known big 18095) rss_empty_kib=$base rss_loaded_kib=$big"
  echo "rss_bytes_per_entry=$(( (big - base) * 1024 / files )) anon_bytes_per_entry=$(( (abig - abase) * 1024 / files )) index_heap_bytes_per_entry=$(( heap / files ))"
  # A clean stop writes the index snapshot; the next start reads it.
  t0=$(date +%s.%N); stop big
  echo "clean_stop_seconds=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN {printf "%.2f", a - b}') snapshot_bytes=$(stat -c %s "$W/big/index.snapshot")"
  secs=$(start_hoard snap 18096 --dir="$W/big")
  sleep 1
  echo "snapshot_ready_seconds=$secs rss_bytes_per_entry=$(( ($(rss_kib snap) - base) * 1024 / files )) anon_bytes_per_entry=$(( ($(anon_kib snap) - abase) * 1024 / files ))"
  stop snap
  sync; echo 3 >/proc/sys/vm/drop_caches
  secs=$(start_hoard snapcold 18097 --dir="$W/big")
  echo "snapshot_cold_ready_seconds=$secs"
  # A crash: no snapshot is left behind (the one read is gone); cold again.
  kill -9 "$(cat "$W/snapcold.pid")"; sleep 0.5
  sync; echo 3 >/proc/sys/vm/drop_caches
  secs=$(start_hoard crash 18098 --dir="$W/big")
  echo "crash_scan_cold_ready_seconds=$secs crash_scan_cold_sizes_known_seconds=$(sizes_known crash 18098)"
  stop crash
  secs=$(start_hoard warm 18099 --dir="$W/big")
  echo "after_clean_stop_warm_ready_seconds=$secs"
  stop warm
  # The same million with one entry in five an action result, whose name
  # holds no size: those are stat'ed before ready. A start after a crash.
  "$BENCH" mkcache "$W/mixed" 1000000 5
  sync; echo 3 >/proc/sys/vm/drop_caches
  secs=$(start_hoard mixed 18100 --dir="$W/mixed")
  echo "mixed_scan_cold_ready_seconds=$secs mixed_scan_cold_sizes_known_seconds=$(sizes_known mixed 18100)"
  kill -9 "$(cat "$W/mixed.pid")"; rm -rf "$W/mixed"
  ;;
concurrent)
  echo "== 1,000 concurrent GETs of a 16 MiB blob: hoard's peak RSS"
  start_hoard conc 18097 --dir="$W/conc" >/dev/null
  head -c $((16 << 20)) /dev/urandom >"$W/b16"
  h=$(sha256sum "$W/b16" | cut -d' ' -f1)
  curl -sf -X PUT --data-binary @"$W/b16" "http://127.0.0.1:18097/cas/$h"
  echo "rss_before_kib=$(rss_kib conc)"
  "$BENCH" concurrent-get 127.0.0.1:18097 "/cas/$h" 1000
  echo "peak_rss_kib=$(hwm_kib conc)"
  stop conc
  ;;
grpc)
  echo "== gRPC: FindMissingBlobs of 10,000 present digests; ByteStream 64 MiB; BatchReadBlobs 100 x 4 KiB"
  shm=$(mktemp -d /dev/shm/hoard-bench.XXXXXX)
  "$HOARD" --http_address=127.0.0.1:18098 --grpc_address=127.0.0.1:19098 --access_log_level=none \
    --dir="$shm/cache" --max_size=8 >"$W/grpc.out" 2>"$W/grpc.err" &
  pids+=($!); echo $! >"$W/grpc.pid"
  until curl -sf http://127.0.0.1:18098/readyz >/dev/null 2>&1; do sleep 0.02; done
  "$BENCH" grpc-findmissing 127.0.0.1:19098 10000 200
  # Server-side: the smallest histogram bucket holding 99% of the calls.
  curl -s http://127.0.0.1:18098/metrics >"$W/metrics"
  total=$(grep '^grpc_server_handling_seconds_count{grpc_method="FindMissingBlobs"' "$W/metrics" | awk '{print $2}')
  grep '^grpc_server_handling_seconds_bucket{grpc_method="FindMissingBlobs"' "$W/metrics" \
    | sed -E 's/.*le="([^"]+)"\} ([0-9]+)$/\1 \2/' \
    | awk -v t="$total" '$2 >= 0.99 * t { print "findmissing_server_p99_at_most_seconds=" $1; exit }'
  # A stock grpcio client, request pre-encoded; then against a hoard with
  # the access log on (bazel-remote's default: one line per digest).
  py="${E2E_PYTHON:-$PWD/target/e2e-venv/bin/python}"
  echo "grpcio access_log=none $("$py" benches/findmissing.py 127.0.0.1:18098 127.0.0.1:19098 10000 200)"
  "$HOARD" --http_address=127.0.0.1:18099 --grpc_address=127.0.0.1:19099 \
    --dir="$shm/cache-log" --max_size=8 >/dev/null 2>"$W/grpclog.err" &
  pids+=($!); echo $! >"$W/grpclog.pid"
  until curl -sf http://127.0.0.1:18099/readyz >/dev/null 2>&1; do sleep 0.02; done
  echo "grpcio access_log=all $("$py" benches/findmissing.py 127.0.0.1:18099 127.0.0.1:19099 10000 200)"
  curl -s http://127.0.0.1:18099/metrics >"$W/metrics-log"
  total=$(grep '^grpc_server_handling_seconds_count{grpc_method="FindMissingBlobs"' "$W/metrics-log" | awk '{print $2}')
  grep '^grpc_server_handling_seconds_bucket{grpc_method="FindMissingBlobs"' "$W/metrics-log" \
    | sed -E 's/.*le="([^"]+)"\} ([0-9]+)$/\1 \2/' \
    | awk -v t="$total" '$2 >= 0.99 * t { print "access_log=all findmissing_server_p99_at_most_seconds=" $1; exit }'
  stop grpclog
  for round in 1 2 3; do
    echo "round=$round $("$BENCH" grpc-bytestream 127.0.0.1:19098 64 3 $((round * 7000)))"
    echo "round=$round $("$BENCH" reference 64 3 $((round * 7000)) 2>/dev/null)"
    # Bazel's own chunk (Chunker.DEFAULT_CHUNK_SIZE): 16 KiB messages.
    echo "round=$round chunk=16KiB $("$BENCH" grpc-bytestream 127.0.0.1:19098 64 3 $((round * 7000 + 500)) 16)"
  done
  "$BENCH" grpc-batchread 127.0.0.1:19098 10 4
  "$BENCH" grpc-smallread 127.0.0.1:19098 10 4
  stop grpc; rm -rf "$shm"
  ;;
s3)
  echo "== S3 tier against moto (the local S3 server the tests use)"
  moto="${MOTO_SERVER:-$PWD/target/e2e-venv/bin/moto_server}"
  [ -x "$moto" ] || { echo "moto_server not found at $moto: run tests/run.sh first" >&2; exit 1; }
  s3=(--s3.endpoint=127.0.0.1:18500 --s3.disable_ssl --s3.bucket=bench --s3.access_key_id=AK --s3.secret_access_key=SK --grpc_address=none)
  start_moto 18500
  shm=$(mktemp -d /dev/shm/hoard-bench.XXXXXX)
  start_hoard s3a 18501 --dir="$shm/a" --host_id=bench-a "${s3[@]}" >/dev/null
  "$BENCH" s3-upload 127.0.0.1:18501 4096 2000 1
  stop s3a
  start_hoard s3a2 18502 --dir="$shm/a2" --host_id=bench-a2 "${s3[@]}" >/dev/null
  "$BENCH" s3-upload 127.0.0.1:18502 $((64 << 20)) 4 5000
  echo "bucket=healthy $("$BENCH" s3-put-latency 127.0.0.1:18502 1000 20000)"
  kill "$(cat "$W/moto-18500.pid")"; sleep 0.5
  echo "bucket=stopped $("$BENCH" s3-put-latency 127.0.0.1:18502 1000 30000)"
  stop s3a2
  start_moto 18500
  start_hoard s3c 18503 --dir="$shm/c" --host_id=bench-c "${s3[@]}" >/dev/null
  start_hoard s3d 18504 --dir="$shm/d" --host_id=bench-d "${s3[@]}" >/dev/null
  "$BENCH" s3-heads 127.0.0.1:18503 127.0.0.1:18504 100 5
  stop s3c; stop s3d
  # FindMissingBlobs on a second host: 1,000 blobs another host uploaded
  # and 1,000 nobody did, asked about 5 times.
  start_hoard s3e 18505 --dir="$shm/e" --host_id=bench-e "${s3[@]}" >/dev/null
  start_hoard s3f 18506 --dir="$shm/f" --host_id=bench-f "${s3[@]/--grpc_address=none/--grpc_address=127.0.0.1:19506}" >/dev/null
  "$BENCH" s3-findmissing 127.0.0.1:18505 127.0.0.1:18506 127.0.0.1:19506 1000 5
  stop s3e; stop s3f; rm -rf "$shm"
  ;;
accounting)
  echo "== PUT latency with and without accounting (S3 tier on in both; moto and ClickHouse on loopback)"
  start_moto 18600
  start_clickhouse "$W/ch" 18623
  shm=$(mktemp -d /dev/shm/hoard-bench.XXXXXX)
  s3=(--s3.endpoint=127.0.0.1:18600 --s3.disable_ssl --s3.bucket=bench --s3.access_key_id=AK --s3.secret_access_key=SK --grpc_address=none)
  start_hoard noacc 18601 --dir="$shm/n" --host_id=bench-n "${s3[@]}" >/dev/null
  start_hoard acc 18602 --dir="$shm/a" --host_id=bench-a "${s3[@]}" --accounting.clickhouse_url=http://127.0.0.1:18623 --accounting.flush_interval=1s >/dev/null
  for round in 1 2 3; do
    echo "round=$round accounting=off $("$BENCH" s3-put-latency 127.0.0.1:18601 1000 $((round * 100000)))"
    echo "round=$round accounting=on  $("$BENCH" s3-put-latency 127.0.0.1:18602 1000 $((round * 100000 + 50000)))"
  done
  stop noacc; stop acc; rm -rf "$shm"
  ;;
ledger)
  # The cost of making each outcome durable before it is counted: the same
  # workload against an older binary (HOARD_BASE, built from the commit
  # before the outcome ledger) and this one, both with accounting on,
  # alternated.
  [ -x "${HOARD_BASE:-}" ] || { echo "ledger: set HOARD_BASE to an older hoard binary" >&2; exit 1; }
  echo "== PUT latency with accounting on: $HOARD_BASE (before) vs $HOARD (after)"
  start_moto 18700
  start_clickhouse "$W/chl" 18723
  shm=$(mktemp -d /dev/shm/hoard-bench.XXXXXX)
  s3=(--s3.endpoint=127.0.0.1:18700 --s3.disable_ssl --s3.bucket=bench --s3.access_key_id=AK --s3.secret_access_key=SK --grpc_address=none
      --accounting.clickhouse_url=http://127.0.0.1:18723 --accounting.flush_interval=1s)
  current=$HOARD
  HOARD=$HOARD_BASE start_hoard before 18701 --dir="$shm/b" --host_id=bench-before "${s3[@]}" >/dev/null
  HOARD=$current start_hoard after 18702 --dir="$shm/a" --host_id=bench-after "${s3[@]}" >/dev/null
  for round in 1 2 3; do
    echo "round=$round before $("$BENCH" s3-put-latency 127.0.0.1:18701 1000 $((round * 100000)))"
    echo "round=$round after  $("$BENCH" s3-put-latency 127.0.0.1:18702 1000 $((round * 100000 + 50000)))"
  done
  stop before; stop after; rm -rf "$shm"
  ;;
mixed)
  echo "== 4 KiB GET p99 alone and beside 4 clients looping 64 MiB GETs and 4 looping 64 MiB PUTs"
  "$BENCH" gen-blobs "$W/mblobs" 2000 4096
  ls "$W/mblobs/cas" | sed 's|^|/cas/|' >"$W/mpaths"
  cycle_lua "$W/mpaths" >"$W/mcycle.lua"
  start_hoard mixed 18110 --dir="$W/mixed" --grpc_address=none >/dev/null
  "$BENCH" upload 127.0.0.1:18110 "$W/mblobs"
  for i in 1 2 3 4 5; do head -c $((64 << 20)) /dev/urandom >"$W/big$i"; done
  bh=$(sha256sum "$W/big5" | cut -d' ' -f1)
  curl -sf -X PUT --data-binary @"$W/big5" "http://127.0.0.1:18110/cas/$bh"
  # The bulk clients share hoard's two cores here; on a CI host they run
  # in other VMs. The second load runs them at nice 19 to model that: what
  # is left is hoard's own scheduling of bulk and small requests.
  for round in 1 2 3; do
  for bulk_nice in 0 19; do
    out=$(wrk -t1 -c4 -d10s --latency -s "$W/mcycle.lua" http://127.0.0.1:18110)
    echo "round=$round load=none req_per_s=$(echo "$out" | awk '/Requests\/sec/ {print $2}') p99=$(echo "$out" | awk '$1 == "99%" {print $2}')"
    loops=()
    : >"$W/moved"
    for i in 1 2 3 4; do
      ( while :; do nice -n "$bulk_nice" curl -s -o /dev/null -w '%{size_download}\n' "http://127.0.0.1:18110/cas/$bh" >>"$W/moved"; done ) & loops+=($!)
      # Each PUT is of a blob already stored after its first round: the
      # body is still received, hashed and verified in full.
      h=$(sha256sum "$W/big$i" | cut -d' ' -f1)
      ( while :; do nice -n "$bulk_nice" curl -s -o /dev/null -w '%{size_upload}\n' -T "$W/big$i" "http://127.0.0.1:18110/cas/$h" >>"$W/moved"; done ) & loops+=($!)
    done
    sleep 2
    # Bulk bytes moved (counted per finished transfer) while wrk runs.
    moved() { awk '{ s += $1 } END { printf "%.0f", s }' "$W/moved"; }
    m0=$(moved)
    out=$(wrk -t1 -c4 -d10s --latency -s "$W/mcycle.lua" http://127.0.0.1:18110)
    m1=$(moved)
    echo "round=$round load=8x64MiB bulk_clients_nice=$bulk_nice req_per_s=$(echo "$out" | awk '/Requests\/sec/ {print $2}') p99=$(echo "$out" | awk '$1 == "99%" {print $2}') bulk_mb_per_s=$(( (m1 - m0) / 10000000 ))"
    sleep 10
    echo "round=$round load=8x64MiB_alone bulk_clients_nice=$bulk_nice bulk_mb_per_s=$(( ($(moved) - m1) / 10000000 ))"
    for p in "${loops[@]}"; do kill "$p" 2>/dev/null || true; done
    wait "${loops[@]}" 2>/dev/null || true
    pkill -f "127.0.0.1:18110/cas/" || true
    sleep 1
  done
  done
  stop mixed
  ;;
*) echo "unknown benchmark $what" >&2; exit 1;;
esac; done

#!/usr/bin/env bash
# Runs every fuzz target in tests/fuzz (cargo-fuzz, libFuzzer, on the stable
# toolchain: no sanitizer, coverage instrumentation only) and fails on the
# first finding, printing the input that triggered it.
#
#   benches/fuzz.sh 3600           each target for an hour
#   benches/fuzz.sh --runs 200000  each target for a fixed number of inputs,
#                                  seed 1: the short deterministic run the
#                                  test command makes
#
# New inputs go to tests/fuzz/corpus/<target>/ (only the seed-* files are
# kept in git); findings to tests/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=time
amount=${1:-60}
if [ "${1:-}" = "--runs" ]; then
  mode=runs
  amount=${2:?usage: benches/fuzz.sh --runs N}
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz 0.13.2"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
fuzz=(cargo fuzz)
dir=tests/fuzz
"${fuzz[@]}" build --fuzz-dir "$dir" --sanitizer none
for t in $("${fuzz[@]}" list --fuzz-dir "$dir"); do
  if [ "$mode" = runs ]; then
    limit=(-runs="$amount" -seed=1)
  else
    limit=(-max_total_time="$amount")
  fi
  log=$(mktemp)
  start=$(date +%s)
  if ! "${fuzz[@]}" run --fuzz-dir "$dir" --sanitizer none "$t" -- \
      "${limit[@]}" -rss_limit_mb=2048 -timeout=10 -max_len=65536 >"$log" 2>&1; then
    echo "fuzz $t: FINDING"
    tail -40 "$log"
    ls "$dir/artifacts/$t" 2>/dev/null || true
    rm -f "$log"
    exit 1
  fi
  done_line=$(grep -E 'DONE' "$log" | tail -1)
  runs=$(grep -oE '^Done [0-9]+ runs' "$log" | awk '{print $2}')
  echo "fuzz $t: ${runs:-?} inputs in $(( $(date +%s) - start )) s, no finding (${done_line#*DONE })"
  rm -f "$log"
done

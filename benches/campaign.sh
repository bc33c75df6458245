#!/usr/bin/env bash
# The full fault campaign for the bill's exactness: two hoards sharing a
# bucket under concurrent HTTP and gRPC writes, one of them killed with
# kill -9 each round, some rounds also without the bucket or ClickHouse.
# CI runs 4 rounds as part of the test suite; this runs as many as asked.
#
#   bash benches/campaign.sh [ROUNDS]      (default 20)
#
# Needs what tests/run.sh installs (ClickHouse, moto in target/e2e-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-20}"
cargo build --locked -q -p hoard
export HOARD_BIN="$PWD/target/debug/hoard"
export MOTO_SERVER="${MOTO_SERVER:-$PWD/target/e2e-venv/bin/moto_server}"
HOARD_CAMPAIGN_ROUNDS="$rounds" cargo test --locked -q -p hoard-e2e --test e2e -- \
  campaign::kill_9_and_outages_leave_the_bill_equal_to_the_bucket --exact --nocapture 2>&1 |
  grep -E '^campaign|test result|panicked|assert'

#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests
# need, checks formatting and lints, builds, and runs every test, including
# the end-to-end ones against real Bazel. A part that cannot be installed or
# started fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: need root to apt-get install $*" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
bazel --version >/dev/null 2>&1 || missing+=(bazel-bootstrap)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
[ -x /usr/sbin/clickhouse-server ] || missing+=(clickhouse-server clickhouse-client)
command -v mount >/dev/null 2>&1 || missing+=(mount)
command -v ccache >/dev/null 2>&1 || missing+=(ccache gcc)
# libFuzzer (the fuzz targets) is C++.
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v keytool >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt_install "${missing[@]}"
fi
bazel --version >/dev/null 2>&1 || { echo "tests/run.sh: bazel is still not usable after installing bazel-bootstrap" >&2; exit 1; }
[ -x /usr/sbin/clickhouse-server ] || { echo "tests/run.sh: clickhouse-server is missing after installing it" >&2; exit 1; }
for tool in ccache g++ prometheus promtool systemd-analyze htpasswd keytool openssl curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "tests/run.sh: $tool is missing after installing its package" >&2; exit 1; }
done

# A real S3 server for the upload tests: moto in server mode, in a venv.
venv="$PWD/target/e2e-venv"
if ! "$venv/bin/moto_server" --help >/dev/null 2>&1; then
  echo "installing moto 5.2.5 into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'moto[s3]==5.2.5' flask flask-cors
fi
"$venv/bin/moto_server" --help >/dev/null 2>&1 || { echo "tests/run.sh: moto_server does not run from $venv" >&2; exit 1; }
export MOTO_SERVER="$venv/bin/moto_server"
# A current ClickHouse engine, embedded, for the DDL and footprint query.
if ! "$venv/bin/python" -c 'import chdb' >/dev/null 2>&1; then
  echo "installing chdb into $venv"
  "$venv/bin/pip" install -q chdb
fi
"$venv/bin/python" -c 'import chdb' >/dev/null 2>&1 || { echo "tests/run.sh: chdb does not import in $venv" >&2; exit 1; }
export CHDB_PYTHON="$venv/bin/python"
# A stock gRPC client for gRPC over TLS.
if ! "$venv/bin/python" -c 'import grpc' >/dev/null 2>&1; then
  echo "installing grpcio into $venv"
  "$venv/bin/pip" install -q grpcio
fi
"$venv/bin/python" -c 'import grpc' >/dev/null 2>&1 || { echo "tests/run.sh: grpcio does not import in $venv" >&2; exit 1; }
export E2E_PYTHON="$venv/bin/python"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo build"
cargo build --locked -p hoard
echo "== cargo test"
HOARD_BIN="$PWD/target/debug/hoard" cargo test --locked --workspace -- --nocapture 2>&1 | tee /tmp/hoard-test.log | grep -E '^(test |running |test result|.*remote cache hits|failures:|---- )|panicked|footprint|drift after|lost acknowledgement' || true
# The pipeline above only filters what is shown; the verdict comes from the log.
if grep -q '^test result: FAILED' /tmp/hoard-test.log || ! grep -q '^test result: ok' /tmp/hoard-test.log; then
  echo "== tests FAILED; full log:"
  cat /tmp/hoard-test.log
  exit 1
fi
passed=$(grep -oE '^test result: ok\. [0-9]+ passed' /tmp/hoard-test.log | awk '{s+=$4} END {print s}')
echo "$passed passed, 0 failed"
echo "== fuzz (short, deterministic)"
benches/fuzz.sh --runs 1000000

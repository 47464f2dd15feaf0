#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, conformance and end-to-end tests against real
# Postgres and Redis. Starts them when they are not running and, on Debian, installs them when
# they are missing. Usage: scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

ensure_postgres
ensure_redis
ensure_tools
ensure_buf
ensure_schemathesis

echo "==> Helm chart"
bash scripts/chart.sh
bash scripts/proto.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi

#!/usr/bin/env bash
# Create throughput and latency over REST and gRPC, with pgbench on the same SQL transaction in
# the same run. Usage: scripts/bench.sh   (BENCH_SECS=10 BENCH_CONNECTIONS=16,64 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_redis
command -v pgbench >/dev/null || apt_install postgresql-client
cargo bench --bench creates --locked

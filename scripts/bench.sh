#!/usr/bin/env bash
# Create throughput and latency over REST and gRPC, with pgbench on the same SQL transaction in
# the same run; bulk creates (batches of 500, the import stream, a 100,000-item import and its
# memory) against single creates and pgbench; the cost of rate limiting and offer reads against
# GetIssuance; then the OID4VCI wallet flow, 5,000 open watch streams, webhook delivery, and
# credential status (cached status lists against GetIssuance, revocations, list rebuilds).
# Usage: scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_redis
command -v pgbench >/dev/null || apt_install postgresql-client
cargo bench --bench creates --locked
cargo bench --bench bulk --locked
cargo bench --bench hardening --locked
cargo bench --bench wallet --locked
cargo bench --bench watch --locked
cargo bench --bench webhooks --locked
cargo bench --bench status --locked

#!/usr/bin/env bash
# Checks the gRPC API: `buf lint` (STANDARD rules, exceptions in proto/buf.yaml) and
# `buf breaking` against the previous commit's proto (against HEAD while proto/ has
# uncommitted changes, so a change is checked before it is committed too).
# Usage: scripts/proto.sh (buf from ISSUER_TEST_BUF, or on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
buf="${ISSUER_TEST_BUF:-buf}"

echo "==> buf lint"
(cd proto && "$buf" lint)

if [ -n "$(git status --porcelain -- proto 2>/dev/null)" ]; then
  base=HEAD
elif git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then
  base=HEAD~1
else
  echo "==> buf breaking: no previous commit to compare with"
  exit 0
fi
echo "==> buf breaking against $base"
"$buf" breaking proto --against ".git#ref=$base,subdir=proto"

